"""The MMARJob manifest: the one contract between the operator and the runtime.

- `spec`: `parse()` reads a manifest (YAML text, a file or a dict), applies the defaults and validates it,
  all from the CRD itself (its openAPIV3Schema and CEL rules), with errors naming the field
  (`spec.steps[1].nodes: ...`);
- `argv`: `step_argv()` turns one step into the runtime's argv (paths as the pod sees them, credentials
  as environment variables, never in the argv);
- `gate`: the gate rule (`gate_decision`) and the `--gate` text;
- `outcome`: how the steps' phases make the job's (`job_outcome`, the skip rules), for the operator and
  `mmar run` alike.

The operator puts a step's argv into a pod; `mmar run JOB.yaml` runs it in a subprocess: one function, two
callers, so a step means the same thing on a cluster and on a laptop.

Imports nothing heavy (no torch, monai, numpy, kubernetes; yaml and jsonschema on first use): the operator
image installs this without the runtime. tests/job/test_job_boundary.py holds the package to that.
"""

from __future__ import annotations

from mmar.job.argv import (CREDENTIAL_ENV, DATA_ROOT, DEFAULT_DICOM_OUTPUT, MASTER_PORT, WORKSPACE_ROOT,  # noqa: F401
                           credentials_secret, data_dir, datalist_path, gpus_of, init_argv, mmar_dir, resources_of,
                           step_argv, uses_mmar)
from mmar.job.gate import GATE_BOUNDS, check_gate, gate_decision, gate_text, parse_gate_text  # noqa: F401
from mmar.job.outcome import (API_VERSION, GATE_NOT_MET, GROUP, KIND, NOT_RUN, PLURAL, PREVIOUS_STEP_FAILED,  # noqa: F401
                              VERSION, job_outcome, not_run, now_iso, skipped_by_gate)
from mmar.job.spec import (CPU_TYPES, GATED_TYPES, MMAR_TYPES, STEP_TYPES, TASKS, TRAINING_TYPES,  # noqa: F401
                           apply_defaults, load, name_of, parse, steps_of, validate)
