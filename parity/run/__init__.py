"""Running a plan: the planner, the runner, the run folder's rules, GPU pool, progress and the launchers.
"""
