"""The case package's public names in one import: the schema (parity.case.schema), the loader
(parity.case.loader) and the device check (parity.case.attention). Each name has its home there.
"""

from parity.case.attention import ATTENTION_DTYPES, attention_problem, check_attention
from parity.case.loader import find_case_files, load_case, load_cases
from parity.case.schema import (ALL_PARAMS, ATTENTION, DEFAULT_TOLERANCES, DP_APIS, DTYPES, FAULT_TABLES, FAULTS,
                                MAX_GLOBAL_BATCH, MAX_MICROBATCHES, MAX_SEED, MAX_SEQ_LEN, MAX_STEPS, MEMBER_SUFFIX,
                                METRICS, MODES, OUTCOMES, PERTURBATIONS, PP_SCHEDULES, REPEAT_SUFFIX,
                                SHARED_TRAIN_KEYS, TOLERANCE_KEYS, TRAIN_KEYS, BackendError, Case, Expect, Probes,
                                Setup, SpecError, Statistical, Tolerance, Train, default_tolerances)
from parity.case.trainer import BUILTIN

__all__ = ["ALL_PARAMS", "ATTENTION", "ATTENTION_DTYPES", "BUILTIN", "DEFAULT_TOLERANCES", "DP_APIS", "DTYPES",
           "FAULT_TABLES", "FAULTS", "MAX_GLOBAL_BATCH", "MAX_MICROBATCHES", "MAX_SEED", "MAX_SEQ_LEN", "MAX_STEPS",
           "MEMBER_SUFFIX", "METRICS", "MODES", "OUTCOMES", "PERTURBATIONS", "PP_SCHEDULES", "REPEAT_SUFFIX",
           "SHARED_TRAIN_KEYS", "TOLERANCE_KEYS", "TRAIN_KEYS", "BackendError", "Case", "Expect", "Probes", "Setup",
           "SpecError", "Statistical", "Tolerance", "Train", "attention_problem", "check_attention",
           "default_tolerances", "find_case_files", "load_case", "load_cases"]
