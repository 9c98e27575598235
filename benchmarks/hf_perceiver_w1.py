r"""Workloads W1 and W2 on the HuggingFace `transformers` Perceiver (PyTorch,
CPU): the peer that `python -m launch.benchmark --workload=W1` (and W2) is
compared against.

Not part of the project's requirements: run it in its own environment,
  bash benchmarks/setup_torch.sh              # -> .venv-torch
  .venv-torch/bin/python benchmarks/hf_perceiver_w1.py            # W1
  .venv-torch/bin/python benchmarks/hf_perceiver_w1.py \
      --side=128 --batch_size=4 --forward --json    # W2 at M = 16,384
  .venv-torch/bin/python benchmarks/hf_perceiver_w1.py --profile  # GEMM share
The side-by-side comparison on equal terms, both malloc policies, is
`python -m benchmarks.compare_pytorch` (run from the project's venv).

The model is HF's PerceiverModel (pixel preprocessor with 32 Fourier bands per
axis, max resolution S = the image side, concatenated: C = 133) with its
encoder's cross-attend rebuilt to W1's shape (1 head, Q/K/V width C, MLP
widening 1), 4 self-attention layers of 8 heads and width 512 in 2 shared
blocks, MLP widening 1, then the mean over the 256 latents and a linear layer
to 1,000 classes: 7,656,115 parameters at every S, as configs/w1.py. W1 is
batch 16 at S = 64; W2 batch 4 at S = 32 .. 256.

One train step = forward, softmax cross-entropy, backward, one Adam update,
float32. With --forward, first the forward pass alone (logits, no autograd,
eval mode: the model has no dropout, so the same numbers) is timed, then the
train step. Each call is timed on its own (CPU tensors: a call has finished
when it returns) after --warmup calls. Prints the parameter count and the
median times; with --json instead one line of JSON with every call's time and
the process's peak resident memory (VmHWM) after the forward phase and at the
end, for benchmarks/compare_pytorch.py. With --profile, the timed train steps
are followed by --iterations more under torch.profiler, and the time per step
in PyTorch's matrix products (aten::mm, addmm, bmm, baddbmm, self time) is
printed beside the profiled step: the peer's side of
benchmarks/gemm_share.py.
"""

import argparse
import json
import os
import statistics
import time

import torch
import transformers
from transformers import PerceiverConfig
from transformers.models.perceiver import modeling_perceiver as hf

GIB = 2.0 ** 30


class W1(torch.nn.Module):
  """W1's model over [B, 3, side, side] images; logits [B, 1000]."""

  def __init__(self, side=64):
    super().__init__()
    config = PerceiverConfig(
        num_latents=256, d_latents=512, d_model=133, num_blocks=2,
        num_self_attends_per_block=4, num_self_attention_heads=8,
        num_cross_attention_heads=1, cross_attention_widening_factor=1,
        self_attention_widening_factor=1, attention_probs_dropout_prob=0.0)
    pre = hf.PerceiverImagePreprocessor(
        config, prep_type='pixels', spatial_downsample=1,
        position_encoding_type='fourier', concat_or_add_pos='concat',
        fourier_position_encoding_kwargs=dict(
            num_bands=32, max_resolution=(side, side), concat_pos=True,
            sine_only=False))
    self.perceiver = hf.PerceiverModel(config, input_preprocessor=pre)
    # W1's cross-attend: 1 head, Q/K/V width = C = 133.
    self.perceiver.encoder.cross_attention = hf.PerceiverLayer(
        config, is_cross_attention=True, qk_channels=133, v_channels=133,
        num_heads=1, q_dim=512, kv_dim=133, widening_factor=1)
    self.head = torch.nn.Linear(512, 1000)

  def forward(self, images):
    latents = self.perceiver(inputs=images).last_hidden_state  # [B, N, D]
    return self.head(latents.mean(dim=1))  # [B, K]


def peak_rss_gib():
  """The process's peak resident memory so far (VmHWM), GiB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024 / GIB
  return float('nan')


def time_calls(fn, iterations, warmup):
  """Seconds of each of `iterations` calls of fn, after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


GEMM_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')


def gemm_split(fn, iterations):
  """(seconds per profiled call of fn, seconds per call in GEMM_OPS)."""
  from torch import profiler  # pylint: disable=g-import-not-at-top
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(iterations):
      fn()
    seconds = time.perf_counter() - start
  gemms = sum(e.self_cpu_time_total for e in prof.key_averages()
              if e.key in GEMM_OPS) / 1e6  # microseconds
  return seconds / iterations, gemms / iterations


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--iterations', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--threads', type=int, default=0,
                      help='torch intra-op threads (0: torch\'s default)')
  parser.add_argument('--side', type=int, default=64,
                      help='image side S (M = S * S); W1: 64')
  parser.add_argument('--batch_size', type=int, default=16,
                      help='batch; W1: 16, W2: 4')
  parser.add_argument('--forward', action='store_true',
                      help='also time the forward pass alone (first)')
  parser.add_argument('--json', action='store_true',
                      help='print one JSON line instead of text')
  parser.add_argument('--profile', action='store_true',
                      help='then profile --iterations train steps: the time '
                           'in matrix products')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = W1(args.side)
  params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  b, s = args.batch_size, args.side
  images = torch.randn(b, 3, s, s)  # channels first, as HF expects
  labels = torch.randint(0, 1000, (b,))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()

  def forward():
    with torch.no_grad():
      return model(images)

  result = {'impl': 'torch', 'params': params, 'batch': b, 'side': s,
            'm': s * s, 'threads': torch.get_num_threads(),
            'versions': f'torch {torch.__version__}, transformers '
                        f'{transformers.__version__}',
            'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}
  if args.forward:
    model.eval()
    result['forward_s'] = time_calls(forward, args.iterations, args.warmup)
    result['rss_forward_gib'] = peak_rss_gib()
    model.train()
  result['train_s'] = time_calls(step, args.iterations, args.warmup)
  result['rss_peak_gib'] = peak_rss_gib()
  if args.profile:
    result['profiled_train_s'], result['gemm_s'] = gemm_split(
        step, args.iterations)
  if args.json:
    print(json.dumps(result), flush=True)
    return
  print(f'HF transformers Perceiver (torch {torch.__version__}, '
        f'{torch.get_num_threads()} threads), batch {b} of {s}x{s} images: '
        f'{params:,} parameters')
  for name in ('forward', 'train'):
    times = result.get(f'{name}_s')
    if times:
      label = 'train step' if name == 'train' else 'forward'
      print(f'{label}: median {statistics.median(times):.3f} s, '
            f'min {min(times):.3f} s over {args.iterations} calls')
  if args.profile:
    step_s, gemm_s = result['profiled_train_s'], result['gemm_s']
    print(f'profiled train step: {step_s:.3f} s, of which matrix products '
          f'({", ".join(GEMM_OPS)}) {gemm_s:.3f} s ({gemm_s / step_s:.0%}), '
          f'the rest {step_s - gemm_s:.3f} s')


if __name__ == '__main__':
  main()
