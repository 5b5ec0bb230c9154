r"""Stage 2: pixel-space DiT drawing a face from a class centre and a landmark image (DESIGN §1).

  python -m vigface_jax.main --config=configs/dit.py \
      --config.data.path=/data/faces_webface_112x112/train.rec \
      --config.stage1.workdir=/runs/stage1 --workdir=/runs/stage2

`stage1.workdir` is a finished stage-1 run (`configs/fr.py`): its `export/` backbone is the
frozen FR network of the identity loss and of the identity-consistency evaluation, and its
`prototypes.npz` holds the real class-centre rows the DiT is conditioned on. Train stage 2 on
the same data as stage 1 (the labels must index the same rows).

Variants (`--config=configs/dit.py:<variant>`):
  default  CASIA-WebFace RecordIO, DiT-B/8 on 112×112 pixels (196 tokens: the patch size 8
           keeps attention cheap at full resolution; DiT-L/8 is the larger option), v-prediction,
           cosine schedule T = 1000, AdamW lr 1e-4, EMA 0.9999, global batch 256, condition
           dropout 0.1, identity-loss weight 0.05 on t < 300, DDIM 50 steps with guidance 4.0.
  demo     procedural faces (the data of `configs/fr.py:demo`) on a 2-core CPU in about half
           an hour: a small DiT drawing at the demo FR network's 48×48 input (samples are
           resized back to 112) with 6×6 patches (64 tokens) scanned over depth and
           cross-faded 1-pixel output margins, the landmark image plus two blurred copies,
           x0-prediction with JiT's v-loss weighting, 3,600 steps of 32, then the sheet and
           the evaluations at guidance 4.0 (guided on an interval, rescaled, DDIM η = 1) and
           a sheet and identity figures at 1.0. README "Stage 2" has what it measured and why
           each setting is what it is.
  tiny     seconds, for tests.
"""

from ml_collections import config_dict

from vigface_jax import config_lib

CASIA_IMAGES = 490_623


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = config_lib.parse_arg(arg, variant="default")
  if args.variant not in ("default", "demo", "tiny"):
    raise ValueError(f"configs/dit.py: unknown variant {args.variant!r}; use default, demo or "
                     "tiny")
  demo, tiny = args.variant == "demo", args.variant == "tiny"
  small = demo or tiny
  config = config_dict.ConfigDict()
  config.task = "dit"
  config_lib.add_parallelism(config)

  config.stage1 = config_dict.ConfigDict()
  config.stage1.workdir = config_dict.placeholder(str)  # a finished configs/fr.py run
  # The frozen FR network a compile-only dry run (--config.dry_run=True) builds when
  # stage1.workdir is not set (a real run reads it from the stage-1 export): configs/fr.py's
  # for this variant. Set model.num_real too (CASIA-WebFace: 10572).
  config.stage1.dry_run_backbone = config_dict.ConfigDict({
      "arch": "tiny" if tiny else ("small" if demo else "ir_se50"),
      "embed_dim": 32 if tiny else (128 if demo else 512),
      "input_size": 48 if small else 112})

  # Every field: config_lib.data_config. For procedural faces data.seed, num_identities and
  # images_per_identity must equal the stage-1 run's (the labels index its rows).
  config.data = config_lib.data_config(
      source="procedural" if small else "recordio",
      global_batch_size=4 if tiny else (32 if demo else 256),
      worker_count=0 if small else 8, read_threads=0 if small else 16,
      num_identities=16 if tiny else 800, images_per_identity=8 if tiny else 24, cache=small)

  config.model = config_dict.ConfigDict()
  config.model.variant = "tiny" if tiny else ("small" if demo else "B")  # dit.VARIANTS
  # Width, number of blocks and attention heads, each None = the variant's: the width / depth /
  # patch trade-offs at fixed compute (README "Generator quality") without a new variant name.
  config.model.hidden = config_dict.placeholder(int)
  config.model.depth = config_dict.placeholder(int)
  config.model.heads = config_dict.placeholder(int)
  # The side the DiT draws at (≤ 112): below 112 the training faces and landmark images are
  # resized down to it and the samples back up to 112 (models/stage2.py).
  # The demo draws at its FR network's 48×48 (configs/fr.py:demo input_size): a CPU-sized
  # DiT can put detail in every pixel there (README "Generator quality").
  config.model.image_size = 48 if demo else 112
  config.model.patch_size = (6 if demo else 16) if small else 8  # must divide model.image_size
  config.model.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU
  config.model.remat = False  # rematerialise blocks (memory for compute)
  # lax.scan over depth: shorter compiles of deep models. Off everywhere: on XLA:CPU the demo's
  # unrolled step (with dit.gradient_boundary and vigface_jax.CPU_XLA_FLAGS) is 1.2x the
  # scanned one (BENCHMARKS.md "XLA:CPU flags (A/B)", `dit_demo`).
  config.model.scan_blocks = False
  # Each token draws its patch plus `output_overlap` pixels around it, cross-faded with its
  # neighbours (dit.fold_patches): with 16×16 patches an undertrained DiT otherwise draws a
  # mosaic with a step at every patch border. 0 = DiT's unpatchify (the default's 8×8 patches).
  config.model.output_overlap = (1 if demo else 4) if small else 0
  # σ (pixels) of Gaussian-blurred copies of the landmark image given to the DiT as extra
  # input channels (models/stage2.py landmark_fields): with large patches only the token
  # holding a landmark's dot would see it. () = the landmark image alone (the paper).
  # σ in pixels at model.image_size: the demo's (2.6, 6.9) at 48 are (6, 16) at 112.
  config.model.landmark_blur = ((2.6, 6.9) if demo else (6.0, 16.0)) if small else ()
  # U-ViT's long skips (Bao et al. 2023): the first depth/2 blocks' outputs feed the last
  # depth/2 blocks through Linear([h, kept]) (models/dit.py), for pixel detail that would
  # otherwise pass every block. Off = DiT (the paper).
  config.model.long_skips = False
  # A zero-initialised 3×3 convolution added to the output image (U-ViT's), the one filter
  # that sees across patch borders. Off = DiT.
  config.model.output_conv = False
  # The landmark image's per-colour moments (centroid and spread of the eyes', nose's and mouth
  # corners' dots: 15 numbers, models/stage2.py landmark_moments) projected into the condition
  # c = t_emb + Linear(row) + Linear(moments): every block sees the pose, not only the tokens
  # under the dots. Off = the paper (the landmark image as input channels only).
  config.model.landmark_pose = False
  config.model.num_real = config_dict.placeholder(int)  # None: the source's num_classes

  config.diffusion = config_dict.ConfigDict()
  config.diffusion.schedule = "cosine"  # cosine | linear
  config.diffusion.timesteps = 1000
  # SNR ÷ shift² at every t (diffusion/schedules.py shift_snr; Hoogeboom et al. 2023, SD3): a
  # schedule made for 64-pixel images is less destructive at larger ones, where neighbouring
  # pixels average its noise away, so high-noise steps that set a face's layout are too few;
  # simple diffusion's rule is shift = resolution / 64 (1.75 at 112). 1 = the schedule as
  # named (the paper). t-keyed settings (id_loss_max_t, sample.guidance_interval) keep their t.
  config.diffusion.schedule_shift = 1.0
  # v | eps | x0 | edm. The demo predicts x0: a 192-wide model trained a few thousand steps
  # does not learn to output the per-pixel noise an ε or v target contains (at 16×16 patches at 112,
  # 768 values per token, it never did; at 6×6 at 48, v drew noise at step 900), while clean
  # faces lie on a low-dimensional manifold (Li & He 2025, "Back to Basics: Let Denoising
  # Generative Models Denoise"). 'edm' (Karras et al. 2022's preconditioning, σ_data 0.5; v
  # is its σ_data = 1 case) is offered for runs long enough to learn the noise; it too drew
  # noise at step 900 of the demo. DiT-B/8 (768 wide, 192 values per patch) keeps the paper's
  # v-prediction.
  config.diffusion.prediction = "x0" if small else "v"
  # none | min_snr | snr | v ('v' on an x0 prediction = JiT's x-prediction with a v-loss,
  # capped at snr_gamma).
  # The demo weighs each example's x0 error by min(SNR + 1, γ = 5): JiT's v-loss on an x0
  # prediction. Unweighted, the 1,800-step x0 model blurs even a nearly clean input (README
  # "Generator quality", benchmarks/figures/x0_predictions_*.jpg); the paper's v default needs
  # no weight.
  config.diffusion.weighting = "v" if demo else "none"
  config.diffusion.snr_gamma = 5.0  # γ: cap of 'v', γ of 'min_snr'
  config.diffusion.cond_drop = 0.1  # row → zero vector (classifier-free guidance)
  # What the DiT is conditioned on: 'row' = the image's class-centre row (the paper); 'image' =
  # the image's own unit stage-1 feature (Arc2Face), a denser condition space holding the
  # within-identity spread; generation then gives each image its identity's row plus a real
  # image's residual (configs/generate.py sample.residual_bank). README "Generator quality", Q.
  config.diffusion.condition = "row"
  config.diffusion.landmark_drop = 0.0  # landmark image → empty image, with this probability
  # ‖f_FR(x̂0) − w‖², 0 to disable. Larger weights buy identity at the cost of the image: the
  # samples become identity-coloured textures that fool the FR network (README "Stage 2").
  config.diffusion.id_loss_weight = 0.05
  config.diffusion.id_loss_max_t = 300  # identity loss only on t ≤ this

  # Every field: config_lib.optim_config.
  config.optim = config_lib.optim_config(
      name="adamw", lr=3e-4 if small else 1e-4, weight_decay=0.0, schedule="constant",
      warmup_steps=0 if tiny else (100 if demo else 5_000), grad_clip_norm=1.0)

  # Every field: config_lib.train_config. The demo's 3,600 steps (README "Generator quality",
  # lever K: twice 1,800) turn every sampled pair the right way and its faces 0.63 as far as
  # real ones (0.17 at 1,800), about 25 minutes of steps alone on a 2-core CPU.
  config.train = config_lib.train_config(
      num_steps=4 if tiny else (3_600 if demo else 200_000),
      log_every=2 if tiny else (50 if demo else 100),
      checkpoint_every=2 if tiny else (900 if demo else 5_000),
      ema_decay=0.999 if small else 0.9999,
      ema_warmup=True)  # decay min(ema_decay, (1 + t) / (10 + t))

  # The sampler every stage-2 evaluator draws with (generate/sampling.py).
  config.sample = config_dict.ConfigDict()
  config.sample.num_steps = 2 if tiny else 50  # DDIM steps
  # DDIM η (0 = deterministic; 1 = DDPM-like noise at every step, which the demo's young
  # model draws cleaner faces with).
  config.sample.eta = 1.0 if small else 0.0
  config.sample.spacing = "trailing"  # leading | trailing | linspace
  config.sample.guidance = 4.0  # classifier-free guidance scale (the paper's 4.0)
  # Guide only at timesteps t_lo ≤ t ≤ t_hi, conditional elsewhere (Kynkäänniemi et al.
  # 2024); None = every step, as the paper. The demo's (150, 880) is σ ∈ (0.25, 5.3] on the
  # cosine schedule, about EDM2's interval; guidance at t < 150 paints a young model's faces
  # with repeated eye-like texture.
  config.sample.guidance_interval = (150, 880) if small else config_dict.placeholder(tuple)
  # φ of Lin et al. 2023 (diffusers' guidance_rescale): pulls the guided prediction's spread
  # back to the conditional one's, against over-saturation; 0 = off, the paper.
  config.sample.guidance_rescale = 0.7 if small else 0.0
  # s_p ≥ 0 (0 = off, the paper): on the guided steps, also push each prediction away from
  # the same row drawn with the data's typical landmark image (the sheet's first column), by
  # s_p · (conditional − typical-pose). A negative condition with its own scale; it costs a
  # third batch per step.
  config.sample.pose_guidance = 0.0
  config.sample.seed = 0  # noise seeds of every evaluator derive from it
  # Landmark sets of the sheet's columns, spread over the data's poses; the identity
  # evaluation cycles through them.
  config.sample.sheet_landmarks = 2 if tiny else 6
  config.sample.batch_size = 4 if tiny else 50  # images per sampler call

  # Evaluators (evaluate/evaluators.py): every = steps between runs, 0 = only at the end
  # (the demo: a mid-run evaluation would cost minutes of its half hour), -1 = off.
  every = 0 if small else 10_000
  sheet_rows, eval_rows = (2, 4) if tiny else (8, 200)
  config.evals = config_dict.ConfigDict()
  config.evals.samples = config_dict.ConfigDict({
      "type": "sample_sheet", "every": every,
      "identities": sheet_rows})  # sheet rows (real rows × sheet_landmarks columns)
  config.evals.identity = config_dict.ConfigDict({
      "type": "identity", "every": every,
      "identities": eval_rows})  # real rows drawn and identified among all rows
  # Landmark following: each row drawn with the most left- and right-turned landmark sets of
  # the training data, and with its landmark set moved by ±shift px (0 = no translation).
  config.evals.landmarks = config_dict.ConfigDict({
      "type": "landmark_following", "every": every,
      "identities": 2 if tiny else (25 if demo else 100), "shift": 8.0})
  # At the end only: a sheet and the identity figures at each scale (a young model such as
  # the demo's draws cleaner, better identified faces below the paper's 4.0).
  config.evals.guidance_sweep = config_dict.ConfigDict({
      "type": "guidance_sweep", "every": 0, "scales": (1.0,) if small else (),
      "sheet_identities": sheet_rows, "eval_identities": eval_rows})
  return config
