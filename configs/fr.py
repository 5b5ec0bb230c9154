r"""Stage 1: IResNet + ArcFace over real and virtual class centres (DESIGN §1).

  python -m vigface_jax.main --config=configs/fr.py \
      --config.data.path=/data/faces_webface_112x112/train.rec --workdir=/runs/stage1

Variants (`--config=configs/fr.py:<variant>`):
  default  the paper's stage 1: CASIA-WebFace RecordIO (n = 10,572 from the data), IR-SE50,
           512-d, k = 120,000 virtual rows, ArcFace s = 64 m = 0.5, global batch 512, SGD
           lr 0.1 (momentum 0.9, wd 5e-4), 1 epoch warm-up + cosine over ~30 epochs. Needs
           `data.path`; fails with a message naming it otherwise.
  demo     procedural faces on this CPU in ~16 minutes: 800 identities × 24 images (rendered
           once, cached), a small IResNet fed the 112×112 crops resized to 48×48, k = 800
           virtual rows, 2,200 steps of batch 64, evaluated on 3,000 held-out procedural pairs
           (95.5% on the 2-core CPU machine; README has the figures).
  tiny     seconds, for tests.

Defaults the paper leaves open are ours (DESIGN §1): s, m, SGD, schedule, flip.
"""

from ml_collections import config_dict

from vigface_jax import config_lib

CASIA_IMAGES = 490_623  # images in insightface's faces_webface_112x112/train.rec


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = config_lib.parse_arg(arg, variant="default")
  if args.variant not in ("default", "demo", "tiny"):
    raise ValueError(f"configs/fr.py: unknown variant {args.variant!r}; use default, demo or tiny")
  demo, tiny = args.variant == "demo", args.variant == "tiny"
  small = demo or tiny
  config = config_dict.ConfigDict()
  config.task = "fr"
  config_lib.add_parallelism(config)
  # The class axis of the centre matrix shards over 'model' (parallel.DEFAULT_RULES): set
  # mesh.shape = (-1, 1, M) to split a large k over M devices.

  config.data = config_dict.ConfigDict()
  config.data.source = "procedural" if small else "recordio"  # data.pipeline.SOURCES
  config.data.path = config_dict.placeholder(str)  # dataset location (RecordIO .rec, ...)
  config.data.seed = 0  # shuffle/augmentation seed; the procedural world seed too
  config.data.global_batch_size = 8 if tiny else (64 if demo else 512)
  config.data.flip_prob = 0.5
  config.data.worker_count = 0 if small else 8  # grain worker processes per host
  config.data.read_threads = 0 if small else 16
  # Procedural source only (ignored by the others).
  config.data.num_identities = 16 if tiny else 800
  config.data.images_per_identity = 8 if tiny else 24
  config.data.cache = small  # render each procedural face once, keep it in memory

  config.model = config_dict.ConfigDict()
  config.model.arch = "tiny" if tiny else ("small" if demo else "ir_se50")  # iresnet.VARIANTS
  config.model.embed_dim = 32 if tiny else (128 if demo else 512)
  config.model.input_size = 32 if tiny else (48 if demo else 112)  # 112 crop resized to this
  config.model.dropout = 0.0
  config.model.dtype = "auto"  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
  config.model.num_real = config_dict.placeholder(int)  # None: the source's num_classes

  config.margin = config_dict.ConfigDict()
  config.margin.name = "arcface"  # arcface | cosface | combined | adaface
  config.margin.s = 32.0 if small else 64.0
  config.margin.m = 0.3 if small else 0.5  # additive angle (ArcFace), cosine (CosFace), AdaFace m
  config.margin.m1 = 1.0  # combined only: cos(m1·θ + m) − m3
  config.margin.m3 = 0.0
  config.margin.h = 0.333  # AdaFace only

  config.virtual = config_dict.ConfigDict()
  config.virtual.num_virtual = 16 if tiny else (800 if demo else 120_000)  # k
  config.virtual.alpha = 0.9  # σ EMA weight of the old value
  config.virtual.per_step = config_dict.placeholder(int)  # None: b_v = round(k·b_r/n)

  steps = 4 if tiny else (2_200 if demo else 30 * CASIA_IMAGES // 512)
  config.optim = config_dict.ConfigDict()
  config.optim.name = "sgd"
  config.optim.lr = 0.1
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "cosine"  # constant | cosine | step
  config.optim.warmup_steps = 0 if tiny else (100 if demo else CASIA_IMAGES // 512)
  config.optim.decay_steps = ()  # 'step' schedule only
  config.optim.grad_clip_norm = 0.0  # 0: no clipping

  config.train = config_dict.ConfigDict()
  config.train.num_steps = steps
  config.train.seed = 0
  config.train.log_every = 2 if tiny else (50 if demo else 100)
  config.train.checkpoint_every = 2 if tiny else (600 if demo else 2_000)
  config.train.keep_checkpoints = 3
  config.train.async_checkpoint = True
  config.train.ema_decay = 0.0  # EMA of the parameters (the exported backbone uses it if > 0)
  config.train.profile_steps = ()  # e.g. (100, 110): traced into workdir/profile

  config.eval = config_dict.ConfigDict()
  config.eval.bins = ()  # insightface .bin packs (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)
  config.eval.every = 0 if tiny else (1_100 if demo else 2_000)  # 0: only at the end
  config.eval.batch_size = 40 if tiny else 200
  config.eval.baselines = small  # raw-pixel baseline on the procedural pairs
  # Held-out procedural pairs written to workdir/verification/procedural.bin (None: none).
  config.eval.procedural_pairs = config_dict.ConfigDict({
      "num_pairs": 40 if tiny else 3000, "num_folds": 10,
      "identities_per_fold": 6 if tiny else 60, "hard_negative_k": 3,
  }) if small else None
  return config
