r"""Stage 1: IResNet + ArcFace over real and virtual class centres (DESIGN §1).

  python -m vigface_jax.main --config=configs/fr.py \
      --config.data.path=/data/faces_webface_112x112/train.rec --workdir=/runs/stage1

Variants (`--config=configs/fr.py:<variant>`):
  default  the paper's stage 1: CASIA-WebFace RecordIO (n = 10,572 from the data), IR-SE50,
           512-d, k = 120,000 virtual rows, ArcFace s = 64 m = 0.5, global batch 512, SGD
           lr 0.1 (momentum 0.9, wd 5e-4), 1 epoch warm-up + cosine over ~30 epochs. Needs
           `data.path`; fails with a message naming it otherwise.
  demo     procedural faces sized for a 2-core CPU (about a quarter of an hour): 800
           identities × 24 images (rendered once, cached), a small IResNet fed the 112×112
           crops resized to 48×48, k = 800 virtual rows, 2,200 steps of batch 64, evaluated on
           3,000 held-out procedural pairs. README "Stage 1" has what it measured.
  auditor  an independent FR model for stage 3's privacy audit (`configs/generate.py`,
           `configs/audit.py`): the demo recipe on 800 procedural identities *disjoint* from
           stage 1's (identity_offset 2,000,000; stage 1 trains on 0..799, the verification
           pairs use 1,000,000+), with another initialisation seed, squeeze-excitation blocks
           (arch small_se), a 96-d embedding and no virtual rows: what a public ArcFace model
           trained on other people is for real users.
  usefulness  the yardstick of what a generated dataset teaches (`configs/quality.py`): the
           demo recipe without virtual rows (k = 0) for 1,000 steps on 200 identities × 20
           images, verified on the demo's held-out procedural pairs; the quality task runs it
           on 200 real procedural identities and on 200 generated ones.
  tiny     seconds, for tests.
  tiny_auditor  the auditor's differences at `tiny` size, for tests.
  tiny_usefulness  the usefulness recipe's differences (k = 0) at `tiny` size, for tests.

Defaults the paper leaves open are ours (DESIGN §1): s, m, SGD, schedule, flip.
"""

from ml_collections import config_dict

from vigface_jax import config_lib
from vigface_jax import parallel

CASIA_IMAGES = 490_623  # images in insightface's faces_webface_112x112/train.rec
# The auditor's procedural people: disjoint from stage 1's (0..) and the pairs' (1,000,000..).
AUDITOR_IDENTITY_OFFSET = 2_000_000


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = config_lib.parse_arg(arg, variant="default")
  variants = ("default", "demo", "tiny", "auditor", "tiny_auditor", "usefulness",
              "tiny_usefulness")
  if args.variant not in variants:
    raise ValueError(f"configs/fr.py: unknown variant {args.variant!r}; use one of {variants}")
  auditor = args.variant in ("auditor", "tiny_auditor")
  useful = args.variant in ("usefulness", "tiny_usefulness")
  demo = args.variant in ("demo", "auditor", "usefulness")
  tiny = args.variant in ("tiny", "tiny_auditor", "tiny_usefulness")
  small = demo or tiny
  config = config_dict.ConfigDict()
  config.task = "fr"
  # parallel.FR_RULES: the batch is split over every device (the backbone is data-parallel
  # whatever the mesh) and the class-centre matrix over 'model': mesh.shape = (-1, 1, M)
  # splits the n + k centres (which M must divide) over M devices; (1, N, 1) is FSDP.
  config_lib.add_parallelism(config, rules=parallel.FR_RULES)

  # Every field: config_lib.data_config. Procedural faces are small enough to render once.
  config.data = config_lib.data_config(
      source="procedural" if small else "recordio",
      global_batch_size=8 if tiny else (64 if demo else 512),
      worker_count=0 if small else 8, read_threads=0 if small else 16,
      num_identities=16 if tiny else (200 if useful else 800),
      images_per_identity=8 if tiny else (20 if useful else 24), cache=small,
      identity_offset=AUDITOR_IDENTITY_OFFSET if auditor else 0)

  config.model = config_dict.ConfigDict()
  config.model.arch = "tiny" if tiny else ("small" if demo else "ir_se50")  # iresnet.VARIANTS
  config.model.embed_dim = 32 if tiny else (128 if demo else 512)
  if auditor:  # another architecture and embedding width than stage 1's
    config.model.arch = "tiny_se" if tiny else "small_se"
    config.model.embed_dim = 24 if tiny else 96
  # The 112 crop is resized to this (a multiple of 16); the CPU demo trains at 48.
  config.model.input_size = 32 if tiny else (48 if demo else 112)
  config.model.dropout = 0.0  # before the embedding layer (arcface_torch's default 0)
  config.model.dtype = "auto"  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
  config.model.num_real = config_dict.placeholder(int)  # None: the source's num_classes
  # The centre matrix gets padding columns (masked out of the softmax, dropped from the reports)
  # up to a multiple of this, so any class count splits over the model axis. None: the number
  # of devices the class axis is split over. Set it (e.g. 128) to resume a checkpoint on a mesh
  # with another model axis: the padded shape must stay the same.
  config.model.class_multiple = config_dict.placeholder(int)

  config.margin = config_dict.ConfigDict()
  config.margin.name = "arcface"  # arcface | cosface | combined | adaface
  config.margin.s = 32.0 if small else 64.0  # logit scale
  config.margin.m = 0.3 if small else 0.5  # additive angle (ArcFace), cosine (CosFace), AdaFace m
  config.margin.m1 = 1.0  # combined only: cos(m1·θ + m) − m3
  config.margin.m3 = 0.0
  config.margin.h = 0.333  # AdaFace only: the norm-adaptive margin's concentration
  # Partial FC (arcface_torch's sample_rate): each step's softmax runs over every class of the
  # step plus uniformly sampled negatives, this fraction of each class-axis shard (at least the
  # step's rows per shard), sampled per shard without gathering the centres. 1.0 = full softmax;
  # 0.1-0.3 is arcface_torch's choice above ~1M identities (WebFace42M).
  config.margin.sample_rate = 1.0

  config.virtual = config_dict.ConfigDict()
  config.virtual.num_virtual = 0 if auditor or useful else (
      16 if tiny else (800 if demo else 120_000))  # k
  config.virtual.alpha = 0.9  # σ EMA weight of the old value
  config.virtual.per_step = config_dict.placeholder(int)  # None: b_v = round(k·b_r/n)

  # Every field: config_lib.optim_config.
  config.optim = config_lib.optim_config(
      name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
      warmup_steps=0 if tiny else (100 if demo else CASIA_IMAGES // 512))

  # Every field: config_lib.train_config. The default trains ~30 epochs of CASIA.
  config.train = config_lib.train_config(
      num_steps=4 if tiny else (1_000 if useful else (2_200 if demo else 30 * CASIA_IMAGES // 512)),
      log_every=2 if tiny else (50 if demo else 100),
      checkpoint_every=2 if tiny else (600 if demo else 2_000), seed=1 if auditor else 0)

  # Evaluators (evaluate/common.py): every = steps between runs, 0 = only at the end, -1 = off.
  config.evals = config_dict.ConfigDict()
  config.evals.verify = config_dict.ConfigDict()
  config.evals.verify.type = "verification"  # the insightface 10-fold protocol
  config.evals.verify.every = 0 if tiny or useful else (1_100 if demo else 2_000)
  config.evals.verify.batch_size = 40 if tiny else 200  # images per embedding call
  config.evals.verify.bins = ()  # insightface .bin packs (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)
  config.evals.verify.baselines = small  # also score raw pixels on the procedural pairs
  # Held-out procedural pairs written to workdir/verification/procedural.bin (None: none).
  config.evals.verify.procedural_pairs = config_dict.ConfigDict({
      "num_pairs": 40 if tiny else 3000, "num_folds": 10,
      "identities_per_fold": 6 if tiny else 60, "hard_negative_k": 3,
  }) if small else config_dict.placeholder(config_dict.ConfigDict)
  return config
