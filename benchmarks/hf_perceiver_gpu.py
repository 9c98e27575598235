r"""The ImageNet Perceiver on HuggingFace `transformers` (PyTorch, GPU): the
peer of benchmarks/gpu.py's JAX rows, at the same shape on the same GPU.

Not part of the project's requirements; needs torch and transformers:
  python3 benchmarks/hf_perceiver_gpu.py --precision=bf16 --batch_size=64
  python3 benchmarks/hf_perceiver_gpu.py --dry-run   # meta device: no compute
  python3 benchmarks/hf_perceiver_gpu.py --tiny --device=cpu \
      --precision=fp32,bf16 --batch_size=4           # a CPU check of the script

The model is built from transformers' own Perceiver modules in the paper's
ImageNet arrangement (configs/imagenet.py, docs/paper.md): HF's
PerceiverModel supplies the 512 x 1024 latents, the first cross-attend and
one block of 6 self-attention layers (8 heads, width 1024, MLP widening 1);
one more PerceiverLayer is the cross-attend whose weights cross-attends 2..8
share; the forward runs 8 times cross-attend + block, then the mean over the
latents and a linear layer to 1,000 classes. Cross-attends have 1 head and
Q/K/V width 261 (HF's 'kv' default): 44,912,254 parameters, as the JAX model.
`--arrangement=stock` instead calls PerceiverModel as it ships: one
cross-attend, then the 8 blocks (42,135,859 parameters).

The byte array [B, 50176, 261] is the pixels concatenated with HF's Fourier
features (generate_fourier_features: 64 bands per axis, max resolution 224,
the positions included), computed once and kept on the device
(`--features=hf`: HF's PerceiverImagePreprocessor, which rebuilds them on the
host at every step). GELU is the tanh approximation, as jax.nn.gelu.

One train step = forward, softmax cross-entropy with label smoothing 0.1,
backward, grad-norm clipping at 10, one AdamW update (fused where
available). bf16: torch.autocast (float32 parameters; softmax and LayerNorm
run in float32); fp32: float32 with TF32 matmuls (XLA's default for float32
on these GPUs; --no-tf32 for full float32). Eager mode. On running out of
memory the batch is halved. Prints JSON lines (`@@gpu-bench {...}`): one
`result` per precision, or with --dry-run one `plan` (parameters, matmul
FLOPs per example by torch.utils.flop_counter on the meta device).
"""

import argparse
import gc
import json
import statistics
import sys
import time
import warnings

import torch
import transformers
from transformers import PerceiverConfig
from transformers.models.perceiver import modeling_perceiver as hf

MARK = '@@gpu-bench '
PAPER = dict(side=224, num_bands=64, num_latents=512, d_latents=1024,
             num_blocks=8, num_self_attends_per_block=6, num_self_heads=8,
             num_classes=1000)
TINY = dict(side=16, num_bands=4, num_latents=16, d_latents=64, num_blocks=2,
            num_self_attends_per_block=2, num_self_heads=4, num_classes=10)


def emit(event):
  print(MARK + json.dumps(event), flush=True)


def log(message):
  print(f'[hf_perceiver_gpu] {message}', file=sys.stderr, flush=True)


def _gelu_tanh():
  """HF's name for the tanh-approximated GELU (one fused kernel)."""
  from transformers import activations  # pylint: disable=g-import-not-at-top
  for name in ('gelu_pytorch_tanh', 'gelu_new'):
    if name in activations.ACT2FN:
      return name
  return 'gelu'


class ImageNetPerceiver(torch.nn.Module):
  """HF Perceiver modules as the paper's ImageNet model: images
  [B, S, S, 3] (channels last; [B, 3, S, S] with features='hf') -> logits
  [B, K]."""

  def __init__(self, sizes=None, arrangement='paper', features='device'):
    super().__init__()
    s = dict(PAPER, **(sizes or {}))
    self.sizes, self.arrangement, self.features = s, arrangement, features
    side, bands = s['side'], s['num_bands']
    channels = 3 + 2 * (2 * bands + 1)  # C: RGB + (x, y, sin, cos) features.
    config = PerceiverConfig(
        num_latents=s['num_latents'], d_latents=s['d_latents'],
        d_model=channels, num_blocks=s['num_blocks'],
        num_self_attends_per_block=s['num_self_attends_per_block'],
        num_self_attention_heads=s['num_self_heads'],
        num_cross_attention_heads=1, cross_attention_widening_factor=1,
        self_attention_widening_factor=1, attention_probs_dropout_prob=0.0,
        hidden_act=_gelu_tanh())
    self.config = config
    # No input preprocessor inside: PerceiverModel reads the byte array.
    self.perceiver = hf.PerceiverModel(config)
    if arrangement == 'paper':
      # Cross-attends 2..R: one set of weights (paper v2).
      self.cross_attend_shared = hf.PerceiverLayer(
          config, is_cross_attention=True, qk_channels=config.qk_channels,
          v_channels=config.v_channels, num_heads=1,
          q_dim=s['d_latents'], kv_dim=channels,
          widening_factor=config.cross_attention_widening_factor,
          use_query_residual=config.use_query_residual)
    elif arrangement != 'stock':
      raise ValueError(f'arrangement must be paper or stock, got '
                       f'{arrangement!r}.')
    self.head = torch.nn.Linear(s['d_latents'], s['num_classes'])
    fourier = dict(num_bands=bands, max_resolution=(side, side),
                   concat_pos=True, sine_only=False)
    if features == 'hf':
      self.preprocessor = hf.PerceiverImagePreprocessor(
          config, prep_type='pixels', spatial_downsample=1,
          position_encoding_type='fourier', concat_or_add_pos='concat',
          fourier_position_encoding_kwargs=fourier)
    elif features == 'device':
      positions = hf.build_linear_positions((side, side)).reshape(
          1, side * side, 2)
      self.register_buffer(
          'position_features',
          hf.generate_fourier_features(positions, **fourier),  # [1, M, C-3]
          persistent=False)
    else:
      raise ValueError(f'features must be device or hf, got {features!r}.')

  def byte_array(self, images):
    """[B, M, C]: pixels, then their position features."""
    if self.features == 'hf':
      return self.preprocessor(images)[0]
    b, h, w, c = images.shape
    return torch.cat([images.reshape(b, h * w, c),
                      self.position_features.expand(b, -1, -1)], dim=-1)

  def forward(self, images):
    x = self.byte_array(images)  # [B, M, C]
    if self.arrangement == 'stock':
      z = self.perceiver(inputs=x).last_hidden_state  # [B, N, D]
    else:
      encoder = self.perceiver.encoder
      z = self.perceiver.embeddings(batch_size=x.shape[0])  # [B, N, D]
      for i in range(self.config.num_blocks):
        cross = encoder.cross_attention if i == 0 else self.cross_attend_shared
        z = cross(z, inputs=x)[0]  # [B, N, D]
        for layer in encoder.self_attends:
          z = layer(z)[0]  # [B, N, D]
    return self.head(z.mean(dim=1))  # [B, K]

  def example_images(self, batch_size, device):
    side = self.sizes['side']
    shape = ((batch_size, 3, side, side) if self.features == 'hf' else
             (batch_size, side, side, 3))
    return torch.randn(shape, device=device)


def versions():
  return f'torch {torch.__version__}, transformers {transformers.__version__}'


def count_params(model):
  return sum(p.numel() for p in model.parameters())


def matmul_flops(model):
  """Forward matmul FLOPs of one example (2 per multiply-add), by
  torch.utils.flop_counter on the meta device; None if unavailable."""
  try:
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
    with FlopCounterMode(display=False) as counter:  # (not under no_grad)
      model(model.example_images(1, 'meta'))
    return int(counter.get_total_flops())
  except Exception as e:  # pylint: disable=broad-except
    log(f'FLOP counter unavailable: {type(e).__name__}: {e}')
    return None


def set_tf32(enabled):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    torch.set_float32_matmul_precision('high' if enabled else 'highest')


def _is_oom(error):
  text = f'{type(error).__name__}: {error}'.lower()
  return 'out of memory' in text or 'outofmemory' in text


def _sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def time_train_step(model, optimizer, precision, batch_size, device, *,
                    deadline, rounds, round_s):
  """Warm-up, then rounds of back-to-back steps; returns a result dict."""
  images = model.example_images(batch_size, device)
  labels = torch.randint(0, model.sizes['num_classes'], (batch_size,),
                         device=device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=precision == 'bf16')

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels,
                                             label_smoothing=0.1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optimizer.step()
    return loss

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  times = []
  for _ in range(2):
    start = time.perf_counter()
    loss = step()
    _sync(device)
    times.append(time.perf_counter() - start)
  first, warm = times
  iterations = max(1, min(10, int(round_s / max(warm, 1e-6))))
  left = deadline - time.time() - 3.0
  rounds = max(1, min(rounds, int(left / (iterations * warm))))
  if left < iterations * warm:
    iterations = max(1, int(left / warm))
  per_round = []
  for _ in range(rounds):
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
      loss = step()
    _sync(device)
    per_round.append((time.perf_counter() - start) / iterations)
  return {'status': 'ok', 'batch': batch_size,
          'step_time_s': statistics.median(per_round),
          'step_time_best_s': min(per_round), 'rounds': rounds,
          'iterations': iterations, 'first_step_s': first,
          'loss': float(loss.detach()),
          'memory_bytes': (torch.cuda.max_memory_allocated(device)
                           if device.type == 'cuda' else None)}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--precision', default='bf16',
                      type=lambda s: s.split(','),
                      help='comma-separated: bf16, fp32')
  parser.add_argument('--batch_size', type=int, default=64,
                      help='first batch tried (halved on out-of-memory)')
  parser.add_argument('--arrangement', default='paper',
                      choices=('paper', 'stock'))
  parser.add_argument('--features', default='device',
                      choices=('device', 'hf'))
  parser.add_argument('--device', default='cuda')
  parser.add_argument('--tiny', action='store_true',
                      help='a small model (for a CPU check of the script)')
  parser.add_argument('--tf32', action=argparse.BooleanOptionalAction,
                      default=True, help='fp32: TF32 matmuls')
  parser.add_argument('--deadline', type=float, default=None,
                      help='unix time by which to be done')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--round_s', type=float, default=2.0)
  parser.add_argument('--dry-run', '--dry_run', dest='dry_run',
                      action='store_true',
                      help='build on the meta device, count, compute nothing')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  sizes = TINY if args.tiny else None
  if args.dry_run:
    with torch.device('meta'):
      model = ImageNetPerceiver(sizes, args.arrangement, args.features)
    emit({'event': 'plan', 'versions': versions(),
          'params': count_params(model), 'arrangement': args.arrangement,
          'matmul_flops_per_example': matmul_flops(model)})
    return 0

  deadline = args.deadline or time.time() + 300.0
  device = torch.device(args.device)
  torch.manual_seed(0)
  model = ImageNetPerceiver(sizes, args.arrangement, args.features).to(device)
  model.train()
  fused = {'fused': True} if device.type == 'cuda' else {}
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3,
                                weight_decay=0.1, **fused)
  name = (torch.cuda.get_device_name(device) if device.type == 'cuda'
          else device.type)
  log(f'{versions()} on {name}: {count_params(model):,} parameters, '
      f'{args.arrangement} arrangement, features on {args.features}')
  for precision in args.precision:
    set_tf32(args.tf32)
    batch = args.batch_size
    result = None
    while batch >= 1 and result is None:
      if deadline - time.time() < 5:
        result = {'status': 'timed out', 'note': 'no time left'}
        break
      out_of_memory = False
      try:
        result = time_train_step(model, optimizer, precision, batch, device,
                                 deadline=deadline, rounds=args.rounds,
                                 round_s=args.round_s)
      except Exception as e:  # pylint: disable=broad-except
        if not _is_oom(e):
          raise
        out_of_memory = True
      if out_of_memory:  # Outside the handler: its frames are gone now.
        log(f'{precision} batch {batch}: out of memory, halving')
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == 'cuda':
          torch.cuda.empty_cache()
        batch //= 2
    if result is None:
      result = {'status': 'does not fit', 'note': 'not even batch 1 fits'}
    result.update(event='result', precision=precision,
                  arrangement=args.arrangement, features=args.features,
                  params=count_params(model), versions=versions(),
                  device=f'1 x {name}', first_batch=args.batch_size,
                  tf32=args.tf32 if precision == 'fp32' else None)
    if result.get('status') == 'ok' and result['batch'] != args.batch_size:
      result['note'] = (f'batch {args.batch_size} ran out of memory; '
                        f'{result["batch"]} fits')
    emit(result)
    if result.get('step_time_s'):
      log(f'{precision} batch {result["batch"]}: '
          f'{result["step_time_s"] * 1e3:.1f} ms / step, '
          f'{result["batch"] / result["step_time_s"]:.1f} images/s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
