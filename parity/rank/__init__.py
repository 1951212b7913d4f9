"""Everything that runs inside a rank (`-m parity.rank PLAN.json`): the train loop, model, data,
parallelisation, shard geometry, probes, weight sketches, memory. Imports parity.core and parity.case only;
it records numbers and never judges them.
"""
