"""Everything that runs inside a rank (`-m parity.rank PLAN.json`): the train loop (train), the model
built and loaded (model, build, parallelize), one step's parts (step), data, planted faults (faults),
shard geometry (shards), probes, the weight digest (digest, sketch, hashing) and memory. Imports
parity.core and parity.case only; it records numbers and never judges them.
"""
