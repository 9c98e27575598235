"""KiCad's 3-D part models as a point-cloud classification set in ModelNet40's
`modelnet40_ply_hdf5_2048` layout, read by the `modelnet40` builder.

  from experiments.data import cad_points
  cad_points.prepare('workdirs/data/kicad')   # apt-get download, or source=

Shapes: P = 2,048 points per cloud, T triangles of one model.

Source: Debian's `kicad-packages3d` (KiCad's part libraries `<Lib>.3dshapes/`
of VRML `.wrl` models, read by `vrml.read_triangles`): a folder holding the
`*.3dshapes` libraries (or any folder above one), a `.deb` file, or None:
`apt-get download kicad-packages3d` into `<out_dir>/cache/` (after
`apt-get update` if the first try fails). Only the .wrl files of a .deb are
extracted, into a temporary folder under out_dir that is removed afterwards.

Classes. A class is a library, with libraries that differ only by a trailing
pitch (`Connector_PinHeader_2.54mm`, `..._2.00mm`, ...) merged into one
(`Connector_PinHeader`): the pipeline scales every cloud to [-1, 1]^3, so the
same header at two pitches is the same cloud. Kept: classes with at least
MIN_MODELS models in at least MIN_FAMILIES families; at most MAX_PER_CLASS
models per class, taken round-robin over the class's families (in a seeded
order), so a capped class keeps all its families.

Families. A model's family is its file name with every number replaced by
'#' (`PinHeader_1x02_P2.54mm_Vertical` -> `PinHeader_#x#_P#mm_Vertical`,
`DIP-8_W7.62mm` -> `DIP-#_W#mm`): the same part in other pin counts, sizes
or pitches. Each class's families are split whole, in a seeded order, so that
about TEST_FRACTION of its models are test (at least one family each side):
no family straddles train and test.

Clouds: P points uniform over the surface (triangle drawn with probability
proportional to its area, then a uniform point of it), float32, in the
model's own units; the pipeline centres and scales them. A model that does
not parse, has no triangles, zero area or non-finite coordinates is skipped,
logged and listed in the summary with its reason; the rest is written.

Written to out_dir: ply_data_{train,test}N.h5 (`data` float32 [n, P, 3],
`label` uint8 [n, 1], at most 2,048 clouds a file, rows shuffled),
shape_names.txt, train_files.txt, test_files.txt (file names, which the
builder resolves in out_dir), chamfer.json, summary.json and an empty
`out_dir/tfds` for the TFDS build (one from an earlier run, stale, is removed).

Chamfer report (chamfer.json): after the pipeline's normalisation, the
Chamfer distance CD(A, B) = (mean_a min_b |a - b| + mean_b min_a |a - b|) / 2
from each test cloud to its nearest train cloud, beside each train cloud's
nearest train cloud of another family, and the floor of two disjoint point
subsets of one model, all with CHAMFER_POINTS points a cloud. Candidates are
shortlisted by a distance-field key (`distance_field`) over all pairs, and the
CHAMFER_SHORTLIST nearest by that key are measured; the 1-NN label agreement
of the test clouds is reported with them.
"""
import collections
import glob
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
import zlib
from typing import Optional

from absl import logging
import h5py
import numpy as np
from scipy import spatial

from experiments.data import vrml

NUM_POINTS = 2048
MIN_MODELS = 20
MIN_FAMILIES = 3
MAX_PER_CLASS = 100
TEST_FRACTION = 0.22
CLOUDS_PER_FILE = 2048
WORKERS = 2
DESCRIPTOR_SIDE = 10
CHAMFER_SHORTLIST = 8
CHAMFER_POINTS = 256
PACKAGE = 'kicad-packages3d'
_NUMBER = re.compile(r'\d+(?:[.,]\d+)*')
_PITCH_SUFFIX = re.compile(r'_\d+(?:\.\d+)?mm$')


def class_of(library: str) -> str:
  """'Connector_PinHeader_2.54mm' -> 'Connector_PinHeader' (see docstring)."""
  return _PITCH_SUFFIX.sub('', library)


def family_of(name: str) -> str:
  """'PinHeader_1x02_P2.54mm_Vertical' -> 'PinHeader_#x#_P#mm_Vertical'."""
  return _NUMBER.sub('#', name)


def find_models(root: str) -> dict[str, list[str]]:
  """Library name -> sorted .wrl paths, for the `*.3dshapes` under root."""
  for folder, dirs, _ in os.walk(root):
    libraries = sorted(d for d in dirs if d.endswith('.3dshapes'))
    if libraries:
      return {lib[:-len('.3dshapes')]: sorted(
          glob.glob(os.path.join(folder, lib, '*.wrl'))) for lib in libraries}
  raise FileNotFoundError(f'No *.3dshapes libraries under {root}.')


def select_classes(libraries: dict[str, list[str]], *, seed: int,
                   min_models: int = MIN_MODELS,
                   min_families: int = MIN_FAMILIES,
                   max_per_class: int = MAX_PER_CLASS):
  """-> ({class: kept paths}, {class: why it is left out})."""
  merged = collections.defaultdict(list)
  for library, paths in libraries.items():
    merged[class_of(library)].extend(paths)
  kept, left_out = {}, {}
  for cls in sorted(merged):
    by_family = collections.defaultdict(list)
    for path in sorted(merged[cls]):
      by_family[family_of(_stem(path))].append(path)
    n, f = len(merged[cls]), len(by_family)
    if n < min_models or f < min_families:
      left_out[cls] = f'{n} models in {f} families'
      continue
    rng = np.random.default_rng([seed, zlib.crc32(cls.encode())])
    queues = [list(rng.permutation(by_family[k])) for k in
              rng.permutation(sorted(by_family))]
    chosen = []  # round-robin over the families
    while len(chosen) < min(n, max_per_class):
      for queue in queues:
        if queue and len(chosen) < max_per_class:
          chosen.append(str(queue.pop()))
    kept[cls] = sorted(chosen)
  return kept, left_out


def split_families(paths: list[str], *, seed: int,
                   test_fraction: float = TEST_FRACTION) -> set[str]:
  """The test paths of one class: whole families, about test_fraction."""
  by_family = collections.defaultdict(list)
  for path in paths:
    by_family[family_of(_stem(path))].append(path)
  if len(by_family) < 2:
    raise ValueError(f'{len(by_family)} family: nothing to split')
  order = np.random.default_rng([seed, zlib.crc32(
      ' '.join(sorted(by_family)).encode())]).permutation(sorted(by_family))
  n, test = len(paths), []
  for family in order:
    size = len(by_family[family])
    if sum(map(len, test)) + size <= (test_fraction + 0.03) * n:
      test.append(by_family[family])
    if sum(map(len, test)) >= (test_fraction - 0.02) * n:
      break
  if not test:  # every family is large: the smallest one
    test = [min(by_family.values(), key=len)]
  return {p for family in test for p in family}


def sample_surface(triangles: np.ndarray, num_points: int,
                   rng: np.random.Generator) -> np.ndarray:
  """[T, 3, 3] -> float32 [num_points, 3], uniform over the surface area."""
  a, b, c = (triangles[:, i].astype(np.float64) for i in range(3))  # [T, 3]
  area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)  # [T]
  total = area.sum()
  if not np.isfinite(total) or total <= 0:
    raise ValueError('zero surface area' if np.isfinite(total)
                     else 'non-finite coordinates')
  cumulative = np.cumsum(area)
  index = np.searchsorted(cumulative, rng.uniform(0, total, num_points),
                          side='right').clip(0, len(area) - 1)  # [P]
  u, v = rng.uniform(size=(2, num_points, 1))
  flip = u + v > 1  # reflect into the triangle: uniform barycentrics
  u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
  points = a[index] + u * (b[index] - a[index]) + v * (c[index] - a[index])
  return points.astype(np.float32)  # [P, 3]


def _stem(path):
  return os.path.splitext(os.path.basename(path))[0]


def _model_key(path):
  return f'{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}'


def _cloud(job):
  """Worker: (path, seed) -> (points [P, 3] or None, reason)."""
  path, seed = job
  try:
    triangles = vrml.read_triangles(path)
    if len(triangles) == 0:
      return None, 'no triangles (no IndexedFaceSet faces)'
    rng = np.random.default_rng([seed, zlib.crc32(_model_key(path).encode())])
    return sample_surface(triangles, NUM_POINTS, rng), ''
  except (vrml.VrmlError, ValueError, MemoryError) as e:
    return None, str(e)


def _run(command, **kwargs):
  try:
    return subprocess.run(command, check=True, capture_output=True,
                          text=True, **kwargs)
  except FileNotFoundError:
    raise OSError(f'{command[0]} not found: needed to read {PACKAGE}.') from None
  except subprocess.CalledProcessError as e:
    raise OSError(f'{" ".join(command)} failed: '
                  f'{(e.stderr or e.stdout).strip()[-300:]}') from None


def download_deb(cache: str) -> str:
  """`apt-get download kicad-packages3d` into cache (kept) -> .deb path."""
  os.makedirs(cache, exist_ok=True)
  debs = sorted(glob.glob(os.path.join(cache, f'{PACKAGE}_*.deb')))
  if not debs:
    try:
      _run(['apt-get', 'download', PACKAGE], cwd=cache)
    except OSError:
      logging.info('apt-get download failed; running apt-get update first.')
      _run(['apt-get', 'update'])
      _run(['apt-get', 'download', PACKAGE], cwd=cache)
    debs = sorted(glob.glob(os.path.join(cache, f'{PACKAGE}_*.deb')))
  if not debs:
    raise OSError(f'apt-get download {PACKAGE} left no .deb in {cache}.')
  return debs[-1]


def extract_wrl(deb: str, into: str) -> None:
  """The .wrl files of a .deb (nothing else) into the folder `into`."""
  if not os.path.isfile(deb):
    raise FileNotFoundError(f'{deb} does not exist.')
  with subprocess.Popen(['dpkg-deb', '--fsys-tarfile', deb],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) as deb_p:
    # -C before the pattern: GNU tar applies -C to the names after it.
    tar = subprocess.run(['tar', '-x', '-C', into, '--wildcards', '*.wrl'],
                         stdin=deb_p.stdout, capture_output=True, text=True)
    deb_p.stdout.close()
    deb_error = deb_p.stderr.read().decode(errors='replace')
  if deb_p.returncode or tar.returncode:
    raise OSError(f'Extracting .wrl files from {deb} failed: '
                  f'{(deb_error + tar.stderr).strip()[-300:]}')


def _pair_chamfer(a: np.ndarray, b: np.ndarray, batch: int = 64):
  """CD of matched pairs: [n, p, 3], [n, p, 3] -> [n]."""
  out = np.empty(len(a), np.float32)
  for s in range(0, len(a), batch):
    x = a[s:s + batch].astype(np.float32)
    y = b[s:s + batch].astype(np.float32)
    d2 = ((x ** 2).sum(2)[:, :, None] + (y ** 2).sum(2)[:, None] -
          2 * x @ y.transpose(0, 2, 1))  # [n, p, p'] squared distances
    forward = np.sqrt(np.maximum(d2.min(2), 0)).mean(1)
    backward = np.sqrt(np.maximum(d2.min(1), 0)).mean(1)
    out[s:s + batch] = (forward + backward) / 2
  return out


def distance_field(clouds: np.ndarray, side: int = DESCRIPTOR_SIDE):
  """[n, p, 3] in [-1, 1]^3 -> [n, side^3]: the distance from each point of a
  side^3 grid over the cube to the nearest cloud point (a shortlist key)."""
  axis = np.linspace(-1, 1, side)
  grid = np.stack(np.meshgrid(axis, axis, axis, indexing='ij'), -1)
  grid = grid.reshape(-1, 3)  # [side^3, 3]
  return np.stack([spatial.cKDTree(c).query(grid)[0] for c in clouds]
                  ).astype(np.float32)


def nearest_chamfer(query, reference, exclude=None):
  """Nearest reference by Chamfer distance (shortlist, then measured; see
  the module docstring) -> (distance [q], index [q]). exclude: bool [q, r]
  pairs that may not be neighbours."""
  q_field = distance_field(query[:, :CHAMFER_POINTS])
  r_field = distance_field(reference[:, :CHAMFER_POINTS])
  coarse = ((q_field ** 2).sum(1)[:, None] + (r_field ** 2).sum(1)[None] -
            2 * q_field @ r_field.T)  # [q, r] squared descriptor distances
  if exclude is not None:
    coarse[exclude] = np.inf
  k = min(CHAMFER_SHORTLIST, reference.shape[0])
  shortlist = np.argpartition(coarse, k - 1, axis=1)[:, :k]  # [q, k]
  pairs_q = np.repeat(np.arange(len(query)), k)
  fine = _pair_chamfer(query[pairs_q, :CHAMFER_POINTS],
                       reference[shortlist.reshape(-1), :CHAMFER_POINTS])
  fine = fine.reshape(len(query), k)
  if exclude is not None:
    fine[exclude[pairs_q, shortlist.reshape(-1)].reshape(fine.shape)] = np.inf
  best = fine.argmin(1)
  return fine[np.arange(len(query)), best], shortlist[np.arange(len(query)),
                                                      best]


def chamfer_report(train, test, train_labels, test_labels, train_families):
  """Distances after the pipeline's normalisation (module docstring)."""
  from experiments.data import modelnet40  # pylint: disable=g-import-not-at-top
  train, test = modelnet40.normalise(train), modelnet40.normalise(test)
  families = np.asarray(train_families)
  test_d, test_nn = nearest_chamfer(test, train)
  train_d, train_nn = nearest_chamfer(train, train,
                                      families[:, None] == families[None])
  half = CHAMFER_POINTS
  floor = _pair_chamfer(test[:, :half], test[:, half:2 * half])

  def stats(d):
    d = d[np.isfinite(d)]
    return {'count': int(d.size), 'mean': float(d.mean()),
            **{f'p{q}': float(np.percentile(d, q)) for q in (10, 50, 90)}}

  return {
      'distance': 'symmetric mean nearest-point Euclidean, normalised clouds',
      'points_per_cloud': CHAMFER_POINTS,
      'test_to_nearest_train': stats(test_d),
      'train_to_nearest_train_other_family': stats(train_d),
      'same_model_two_samples_floor': stats(floor),
      'test_1nn_label_agreement': float(
          (train_labels[test_nn] == test_labels).mean()),
      'train_1nn_other_family_label_agreement': float(
          (train_labels[train_nn] == train_labels).mean()),
  }


def _write_split(out_dir, split, clouds, labels, rng):
  order = rng.permutation(len(labels))
  names = []
  for i, start in enumerate(range(0, len(order), CLOUDS_PER_FILE)):
    rows = order[start:start + CLOUDS_PER_FILE]
    names.append(f'ply_data_{split}{i}.h5')
    with h5py.File(os.path.join(out_dir, names[-1]), 'w') as f:
      f['data'] = clouds[rows]
      f['label'] = labels[rows, None].astype(np.uint8)
  with open(os.path.join(out_dir, f'{split}_files.txt'), 'w') as f:
    f.write(''.join(f'{name}\n' for name in names))


def _source_root(source, out_dir, scratch):
  if source is not None and os.path.isdir(source):
    return source
  deb = source if source is not None else download_deb(
      os.path.join(out_dir, 'cache'))
  extract_wrl(deb, scratch)
  return scratch


def prepare(out_dir: str, *, source: Optional[str] = None,
            seed: int = 0) -> dict:
  """Builds the set in out_dir (module docstring) -> summary dict."""
  start = time.time()
  os.makedirs(out_dir, exist_ok=True)
  seconds = {}
  with tempfile.TemporaryDirectory(dir=out_dir, prefix='wrl-') as scratch:
    root = _source_root(source, out_dir, scratch)
    seconds['source'] = time.time() - start
    classes, left_out = select_classes(
        find_models(root), seed=seed, min_models=MIN_MODELS,
        min_families=MIN_FAMILIES, max_per_class=MAX_PER_CLASS)
    if len(classes) < 2:
      raise ValueError(f'{root}: {len(classes)} classes with at least '
                       f'{MIN_MODELS} models in {MIN_FAMILIES} families.')
    names = sorted(classes)
    jobs = [(p, seed) for cls in names for p in classes[cls]]
    t = time.time()
    with multiprocessing.get_context('spawn').Pool(WORKERS) as pool:
      results = pool.map(_cloud, jobs, chunksize=4)
    seconds['parse_and_sample'] = time.time() - t
  clouds, skipped = {}, []
  for (path, _), (points, reason) in zip(jobs, results):
    if points is None:
      logging.warning('Skipped %s: %s', _model_key(path), reason)
      skipped.append({'file': _model_key(path), 'reason': reason})
    else:
      clouds[path] = points

  kept = {}
  for cls in names:
    paths = [p for p in classes[cls] if p in clouds]
    families = len({family_of(_stem(p)) for p in paths})
    if len(paths) < MIN_MODELS or families < MIN_FAMILIES:
      left_out[cls] = (f'{len(paths)} readable models in {families} families '
                       'after skipping unreadable ones')
    else:
      kept[cls] = paths
  names = sorted(kept)
  if len(names) < 2:
    raise ValueError(f'{root}: {len(names)} classes left after skipping '
                     f'{len(skipped)} unreadable models.')
  split = {'train': ([], [], []), 'test': ([], [], [])}
  per_class = {}
  for label, cls in enumerate(names):
    paths = kept[cls]
    test = split_families(paths, seed=seed, test_fraction=TEST_FRACTION)
    for path in paths:
      points, labels, families = split['test' if path in test else 'train']
      points.append(clouds[path])
      labels.append(label)
      families.append(family_of(_stem(path)))
    per_class[cls] = {'train': len(paths) - len(test), 'test': len(test),
                      'families': len({family_of(_stem(p)) for p in paths})}
  arrays = {s: (np.stack(v[0]), np.asarray(v[1], np.int64), v[2])
            for s, v in split.items()}

  for path in [os.path.join(out_dir, 'tfds')] + glob.glob(
      os.path.join(out_dir, 'ply_data_*.h5')):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  os.makedirs(os.path.join(out_dir, 'tfds'))  # the config's data_dir
  rng = np.random.default_rng(seed)
  for s in ('train', 'test'):
    _write_split(out_dir, s, arrays[s][0], arrays[s][1], rng)
  with open(os.path.join(out_dir, 'shape_names.txt'), 'w') as f:
    f.write(''.join(f'{name}\n' for name in names))

  t = time.time()
  chamfer = chamfer_report(arrays['train'][0], arrays['test'][0],
                           arrays['train'][1], arrays['test'][1],
                           arrays['train'][2])
  seconds['chamfer'] = time.time() - t
  with open(os.path.join(out_dir, 'chamfer.json'), 'w') as f:
    json.dump(chamfer, f, indent=1)
  test_counts = np.bincount(arrays['test'][1], minlength=len(names))
  seconds['total'] = time.time() - start
  summary = {
      'classes': names, 'num_classes': len(names),
      'counts': {s: int(len(arrays[s][1])) for s in arrays},
      'per_class': per_class,
      'majority_class_rate_test': float(test_counts.max() / test_counts.sum()),
      'skipped': skipped, 'left_out_classes': left_out,
      'rules': {'min_models': MIN_MODELS, 'min_families': MIN_FAMILIES,
                'max_per_class': MAX_PER_CLASS,
                'test_fraction': TEST_FRACTION, 'seed': seed},
      'chamfer': chamfer, 'seconds': seconds,
  }
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary
