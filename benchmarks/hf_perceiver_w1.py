r"""Workload W1 on the HuggingFace `transformers` Perceiver (PyTorch, CPU): the
peer that `python -m launch.benchmark --workload=W1` is compared against.

Not part of the project's requirements: run it in its own environment,
  python3 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 transformers
  /tmp/torchvenv/bin/python benchmarks/hf_perceiver_w1.py

The model is HF's PerceiverModel (pixel preprocessor with 32 Fourier bands per
axis, max resolution 64, concatenated: C = 133) with its encoder's
cross-attend rebuilt to W1's shape (1 head, Q/K/V width C, MLP widening 1),
4 self-attention layers of 8 heads and width 512 in 2 shared blocks, MLP
widening 1, then the mean over the 256 latents and a linear layer to 1,000
classes. One train step = forward, softmax cross-entropy, backward, one Adam
update, float32. Prints the parameter count and the step time.
"""

import argparse
import statistics
import time

import torch
from transformers import PerceiverConfig
from transformers.models.perceiver import modeling_perceiver as hf


class W1(torch.nn.Module):

  def __init__(self):
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
            num_bands=32, max_resolution=(64, 64), concat_pos=True,
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--iterations', type=int, default=5)
  parser.add_argument('--threads', type=int, default=0)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = W1()
  params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  images = torch.randn(16, 3, 64, 64)  # channels first, as HF expects
  labels = torch.randint(0, 1000, (16,))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()

  step()  # warm-up
  times = []
  for _ in range(args.iterations):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  print(f'HF transformers Perceiver (torch {torch.__version__}, '
        f'{torch.get_num_threads()} threads), W1: {params:,} parameters')
  print(f'train step: median {statistics.median(times):.3f} s, '
        f'min {min(times):.3f} s over {args.iterations} steps')


if __name__ == '__main__':
  main()
