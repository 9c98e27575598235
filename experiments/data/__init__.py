"""Input pipelines: one module per dataset, one interface.

Every dataset module here exposes

  NUM_CLASSES: int
  num_examples(split, **kwargs) -> int
      Size of a split (used to turn epochs into steps and to size evaluation).
  load(split, *, batch_size, is_training, seed=0, start_step=0,
       process_index=0, process_count=1, data_dir=None, **dataset_kwargs)
      -> Iterator[dict[str, np.ndarray]]

`batch_size` is the per-process batch (global batch / process_count). Each
process reads its own disjoint shard of the data. Every yielded dict holds

  inputs  float32  [B, ...]            e.g. [B, H, W, C] images, [B, P, 3] points,
                                       [B, T] raw audio. At evaluation a dataset
                                       with several clips per example yields
                                       [B, num_clips, ...]; the runner averages the
                                       clips' scores.
  labels  int32 [B] class ids, or float32 [B, K] (soft / multi-hot labels).
  mask    bool  [B]  False for the padding of the last evaluation batch, so every
                     evaluation example counts exactly once.

Training iterators repeat forever and are deterministic given `seed`: the
iterator made with `start_step=s` yields exactly what a fresh one yields after
`s` batches (same order, same augmentation), so a resumed run sees the data an
uninterrupted run would. Evaluation iterators make one pass over the split.
"""
