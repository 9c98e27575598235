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

Details shared by the modules here (each module's docstring has the rest):

  * Dataset-specific keyword arguments of `load` are flat and also accepted
    (and ignored where irrelevant) by `num_examples`, so a runner can pass one
    dict to both. `data_dir` is the TFDS data directory (None: TFDS's
    default); `manual_dir` the user's downloaded files, from which a dataset
    that is not prepared yet is built. Nothing here downloads.
  * `inputs` may be a dict of arrays for multi-modal data: AudioSet with
    modality='audio_video' yields {'audio': [B, ...], 'video': [B, ...]}
    (with the [B, num_clips, ...] layout at evaluation for both).
  * Every process yields the same number of evaluation batches (the shards
    differ by at most one example; the rest is padding with mask False).
  * Modules: fashion_mnist (numpy, in memory), imagenet (TFDS imagenet2012),
    modelnet40 (own TFDS builder, in memory), audioset (own TFDS builder);
    in_memory and tfds_pipeline hold the shared ordering and padding logic;
    `python -m experiments.data.benchmark --dataset=NAME` measures the input
    throughput of a training pipeline.
  * Not dataset modules (no `load`): preparation tools that write real data
    in a dataset's own on-disk layout, which that dataset's module then
    reads like any user's copy: `python -m experiments.data.prepare
    --dataset=drums|kicad` (drums.py: Debian's drum recordings as an
    AudioSet; cad_points.py with the VRML reader vrml.py: Debian's KiCad CAD
    models as a ModelNet40), and the builder audioset_builder.py.
"""
