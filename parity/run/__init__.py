"""Running a plan: the planner, the runner, the GPU pool, progress and the launchers. Imports parity.trainers,
parity.rank, parity.case and parity.core; judging is the session's (parity.session).
"""
