r"""The privacy audit alone, on any dataset in any supported format (DESIGN §1, "The privacy audit").

  python -m vigface_jax.main --config=configs/audit.py \
      --config.dataset.source=imagefolder --config.dataset.path=/runs/vigface_b/imagefolder \
      --config.stage1.workdir=/runs/stage1 \
      --config.audit.encoders='("/models/insightface_r100",)' \
      --config.audit.heldout.source=imagefolder --config.audit.heldout.path=/data/gallery \
      --workdir=/runs/vigface_b_audit

`dataset` is the set to audit (identity-labelled: one folder per identity, RecordIO class ids,
ArrayRecord labels); `training` the real data it must not reproduce (None: the data of the
`stage1.workdir` run); encoders: the stage-1 export (when `stage1.workdir` is set) and every
`audit.encoders` backbone. With real training data `audit.heldout` must name a gallery of
people who are not in it. Writes audit.json, audit_hist.png, audit_closest.png,
audit_identities.csv and summary.json (`generate/audit_task.py`).

Variants (`--config=configs/audit.py:<variant>`):
  default  the fields above, to be set on the command line.
  demo     the CPU demo's generated dataset (`configs/generate.py:demo` into
           workdir/gen_demo) read back from its RecordIO export, audited against the stage-1
           demo's procedural training data: pass the workdirs as below.
  tiny     seconds, for tests.

  python -m vigface_jax.main --config=configs/audit.py:demo \
      --config.dataset.path=<gen dir>/recordio/train.rec --config.stage1.workdir=<stage-1 dir> \
      --config.audit.encoders='("<auditor dir>",)' --workdir=<audit dir>
"""

from ml_collections import config_dict

from vigface_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = config_lib.parse_arg(arg, variant="default")
  if args.variant not in ("default", "demo", "tiny"):
    raise ValueError(f"configs/audit.py: unknown variant {args.variant!r}; use default, demo or "
                     "tiny")
  demo, tiny = args.variant == "demo", args.variant == "tiny"
  config = config_dict.ConfigDict()
  config.task = "audit"
  config_lib.add_parallelism(config)
  config.stage1 = config_dict.ConfigDict()
  config.stage1.workdir = config_dict.placeholder(str)  # its export/ audits, its data trains
  # The audited dataset (every field: config_lib.data_config; source and path matter here).
  config.dataset = config_lib.data_config(
      source="recordio" if (demo or tiny) else "imagefolder", worker_count=0)
  # The real training data; None = the stage-1 run's data section.
  config.training = config_dict.placeholder(config_dict.ConfigDict)
  config.max_images = config_dict.placeholder(int)  # audit only the first N images (None: all)
  # Every field: config_lib.audit_config.
  config.audit = config_lib.audit_config(
      heldout_ids=8 if tiny else 400, heldout_images=2 if tiny else 20,
      leak_ids=2 if tiny else (32 if demo else 100),
      fmrs=(1e-2,) if tiny else (1e-3, 1e-4))
  return config
