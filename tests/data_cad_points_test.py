"""VRML reader and KiCad point-cloud set: tiny real-format files made here."""
import json
import math

import h5py
import numpy as np
import pytest

from configs import modelnet40 as modelnet40_config
from experiments.data import cad_points
from experiments.data import modelnet40
from experiments.data import vrml

QUAD = [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_nested_transforms_def_use_and_quads(tmp_path):
  text = """#VRML V2.0 utf8
# a comment: Transform { translation 9 9 9 }
DEF Quad Shape { geometry IndexedFaceSet {
  coord Coordinate { point [0 0 0, 1 0 0, 1 1 0, 0 1 0] }
  coordIndex [0, 1, 2, 3, -1] } }
Transform { translation 10 0 0 rotation 0 0 1 1.5707963267948966
  scale 2 2 2 children [ Transform { translation 0 0 5 children USE Quad } ] }
"""
  got = vrml.read_triangles(_write(tmp_path, 'a.wrl', text))
  assert got.shape == (4, 3, 3) and got.dtype == np.float32
  # Fan (0, 1, 2), (0, 2, 3); under the transforms p -> T + R(2 (p + 5z)),
  # R a quarter turn about z: (x, y, z) -> (-y, x, z).
  moved = {0: [10, 0, 10], 1: [10, 2, 10], 2: [8, 2, 10], 3: [8, 0, 10]}
  expected = [[QUAD[0], QUAD[1], QUAD[2]], [QUAD[0], QUAD[2], QUAD[3]],
              [moved[0], moved[1], moved[2]], [moved[0], moved[2], moved[3]]]
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_center_and_scale_orientation():
  half_turn = vrml._Node('Transform')  # rotation about the center (1, 0, 0)
  half_turn.fields = {'center': ['1', '0', '0'],
                      'rotation': ['0', '0', '1', str(math.pi)]}
  np.testing.assert_allclose(vrml.transform_matrix(half_turn) @ [0, 0, 0, 1],
                             [2, 0, 0, 1], atol=1e-12)
  # scale x2 along the axes turned a quarter about z: a stretch along y.
  stretch = vrml._Node('Transform')
  stretch.fields = {'scale': ['2', '1', '1'],
                    'scaleOrientation': ['0', '0', '1', str(math.pi / 2)]}
  m = vrml.transform_matrix(stretch)
  np.testing.assert_allclose(m @ [0, 1, 0, 1], [0, 2, 0, 1], atol=1e-12)
  np.testing.assert_allclose(m @ [1, 0, 3, 1], [1, 0, 3, 1], atol=1e-12)


def test_kicad_style_crlf_switch_and_polygons(tmp_path):
  text = ('#VRML V2.0 utf8\r\n#kicad StepUp wrl exported\r\n'
          'Shape {\r\n appearance Appearance {material DEF PIN-01 Material {\r\n'
          '  diffuseColor 0.8 0.8 0.7\r\n  shininess 0.7\r\n  }\r\n }\r\n}\r\n'
          'Shape { geometry IndexedFaceSet \r\n{ creaseAngle 0.50 solid FALSE '
          'coordIndex [0,1,2,3,4,-1,0,1,-1,2,1,0]\r\n'
          'coord Coordinate { point [0 0 0,2 0 0,2 1 0,1 2 0,0 1 0,]\r\n}}\r\n'
          'appearance Appearance{material USE PIN-01 }\r\n}\r\n'
          'Switch { whichChoice 1 choice [\r\n'
          ' Shape { geometry IndexedFaceSet { coord Coordinate { point '
          '[0 0 9, 1 0 9, 0 1 9] } coordIndex [0 1 2] } }\r\n'
          ' Group { children [ Shape { geometry IndexedLineSet { coord '
          'Coordinate { point [0 0 7, 1 0 7] } coordIndex [0 1 -1] } }\r\n'
          ' Shape { geometry IndexedFaceSet { coord Coordinate { point '
          '[5 5 5, 6 5 5, 5 6 5] } coordIndex [0 1 2 -1] } } ] } ] }\r\n')
  got = vrml.read_triangles(_write(tmp_path, 'k.wrl', text))
  # The pentagon fans into 3, the 2-vertex polygon is dropped, the last
  # (unterminated) triangle kept; Switch draws choice 1 only (no z = 9), and
  # the line set has no faces.
  pentagon = np.array([[0, 0, 0], [2, 0, 0], [2, 1, 0], [1, 2, 0], [0, 1, 0]])
  expected = [pentagon[[0, 1, 2]], pentagon[[0, 2, 3]], pentagon[[0, 3, 4]],
              pentagon[[2, 1, 0]], [[5, 5, 5], [6, 5, 5], [5, 6, 5]]]
  np.testing.assert_allclose(got, expected)


@pytest.mark.parametrize('body, reason', [
    ('Shape { geometry IndexedFaceSet { coord Coordinate { point [0 0 0] }',
     'unclosed'),
    ('Shape { geometry IndexedFaceSet { coord Coordinate { point '
     '[0 0 0, 1 0 0, 0 1 0] } coordIndex [0 1 3 -1] } }', 'outside the 3'),
    ('Shape { geometry IndexedFaceSet { coord Coordinate { point '
     '[0 0 0, 1 0 zero] } coordIndex [0 1 2] } }', "'zero', not a number"),
    ('Transform { children USE Missing }', 'USE Missing before'),
    ('Transform { rotation 0 0 1 children [] }', 'rotation needs 4'),
])
def test_broken_files_name_the_file_and_reason(tmp_path, body, reason):
  path = _write(tmp_path, 'broken.wrl', '#VRML V2.0 utf8\n' + body + '\n')
  with pytest.raises(vrml.VrmlError, match=f'broken.wrl: .*{reason}'):
    vrml.read_triangles(path)


def test_not_vrml2_is_named(tmp_path):
  path = _write(tmp_path, 'old.wrl', '#VRML V1.0 ascii\nSeparator { }\n')
  with pytest.raises(vrml.VrmlError, match='old.wrl: does not start with'):
    vrml.read_triangles(path)


def test_sampling_is_uniform_over_area_and_on_the_surface():
  big = [[0, 0, 0], [3, 0, 0], [0, 1, 0]]  # area 1.5 in z = 0
  small = [[0, 0, 1], [1, 0, 1], [0, 1, 1]]  # area 0.5 in z = 1
  points = cad_points.sample_surface(np.array([big, small], np.float32),
                                     20_000, np.random.default_rng(0))
  assert points.shape == (20_000, 3) and points.dtype == np.float32
  on_small = points[:, 2] == 1
  assert np.all(on_small | (points[:, 2] == 0))
  assert abs(on_small.mean() - 0.25) < 0.015  # 5 sigma at 20,000 draws
  x, y = points[:, 0], points[:, 1]
  assert np.all((x >= 0) & (y >= 0))
  assert np.all(np.where(on_small, x + y, x / 3 + y) <= 1 + 1e-6)
  # Uniform within a triangle: the mean is the centroid.
  np.testing.assert_allclose(points[on_small].mean(0), [1 / 3, 1 / 3, 1],
                             atol=0.02)
  np.testing.assert_allclose(points[~on_small].mean(0), [1, 1 / 3, 0],
                             atol=0.03)
  with pytest.raises(ValueError, match='zero surface area'):
    cad_points.sample_surface(np.array([[[0, 0, 0], [1, 0, 0], [2, 0, 0]]]),
                              5, np.random.default_rng(0))


def test_families_and_classes():
  assert cad_points.family_of('PinHeader_1x02_P2.54mm_Vertical') == \
      cad_points.family_of('PinHeader_2x40_P1.00mm_Vertical') == \
      'PinHeader_#x#_P#mm_Vertical'
  assert cad_points.family_of('DIP-8_W7.62mm_Socket') == 'DIP-#_W#mm_Socket'
  assert cad_points.family_of('DIP-8_W7.62mm') != cad_points.family_of(
      'DIP-8_W7.62mm_Socket')
  assert cad_points.class_of('Connector_PinHeader_2.54mm') == \
      'Connector_PinHeader'
  assert cad_points.class_of('Package_DIP') == 'Package_DIP'


def test_family_split_never_straddles():
  kinds = ('PinHeader_{}x{:02d}_P2.54mm_Vertical',
           'PinHeader_{}x{:02d}_P2.54mm_Horizontal',
           'PinHeader_{}x{:02d}_P1.27mm_SMD', 'Socket_{}x{:02d}_W7.62mm',
           'Box_{}x{:02d}')
  # Families of 4, 10, 16, 22 and 28 models (1 or 2 rows of n pins).
  paths = [f'/lib/{k.format(r, n)}.wrl' for j, k in enumerate(kinds)
           for r in (1, 2) for n in range(2, 4 + 3 * j)]
  assert len({cad_points.family_of(k) for k in kinds}) == 5
  for seed in range(20):
    test = cad_points.split_families(paths, seed=seed)
    families = lambda ps: {cad_points.family_of(cad_points._stem(p)) for p in ps}
    assert families(test).isdisjoint(families(set(paths) - test))
    assert 0 < len(test) < len(paths)
    assert len(test) <= 0.5 * len(paths)


def _box_vrml(size, pins):
  """A box of `size` with `pins` thin legs below it, as KiCad writes."""
  corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1)
                      for z in (0, 1)], float)
  faces = '0,1,3,2,-1,4,6,7,5,-1,0,4,5,1,-1,2,3,7,6,-1,0,2,6,4,-1,1,5,7,3,-1'
  shapes = []
  for offset, scale in [((0, 0, 0), size)] + [
      ((0.5 * i, 0.1, -1.0), (0.1, 0.1, 1.0)) for i in range(pins)]:
    points = corners * scale + offset
    shapes.append('Shape { geometry IndexedFaceSet { coordIndex [' + faces +
                  '] coord Coordinate { point [' + ','.join(
                      ' '.join(f'{v:.3f}' for v in p) for p in points) +
                  '] } } }')
  return '#VRML V2.0 utf8\n' + '\n'.join(shapes) + '\n'


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """Three classes of 8 models in 4 families (flat, tall and long boxes),
  a broken model, a class with too few models; MIN_MODELS patched to 6."""
  root = tmp_path_factory.mktemp('kicad')
  source = root / 'usr' / 'share' / 'kicad' / '3dmodels'
  shapes = {'Flat_2.54mm': (4, 3, 0.5), 'Flat_1.27mm': (4, 3, 0.5),
            'Tall': (1, 1, 4), 'Long': (8, 1, 1), 'Tiny': (1, 1, 1)}
  for library, size in shapes.items():
    folder = source / f'{library}.3dshapes'
    folder.mkdir(parents=True)
    count = 2 if library == 'Tiny' else 4 if '_' in library else 8
    for i in range(count):
      family = 'ABCD'[i % 4]
      stretched = np.array(size) * (1 + 0.1 * i)
      (folder / f'{family}_Part_{i + 2}x{i}_{library}.wrl').write_text(
          _box_vrml(stretched, pins=2 + i))
  (source / 'Tall.3dshapes' / 'D_Part_broken.wrl').write_text(
      '#VRML V2.0 utf8\nShape { geometry IndexedFaceSet { coord Coordinate '
      '{ point [0 0 0, 1 0 0, 0 1 0] } coordIndex [0 1 7 -1] } }\n')
  out = root / 'out'
  patch = pytest.MonkeyPatch()
  patch.setattr(cad_points, 'MIN_MODELS', 6)
  try:
    summary = cad_points.prepare(str(out), source=str(root), seed=3)
  finally:
    patch.undo()
  return out, summary


def test_prepare_writes_the_modelnet40_layout(prepared):
  out, summary = prepared
  # Flat_2.54mm and Flat_1.27mm are one class; Tiny is left out.
  assert summary['classes'] == ['Flat', 'Long', 'Tall']
  assert (out / 'shape_names.txt').read_text() == 'Flat\nLong\nTall\n'
  assert summary['left_out_classes'] == {'Tiny': '2 models in 2 families'}
  assert [s['file'] for s in summary['skipped']] == [
      'Tall.3dshapes/D_Part_broken.wrl']
  assert 'outside the 3 points' in summary['skipped'][0]['reason']
  assert (out / 'train_files.txt').read_text() == 'ply_data_train0.h5\n'
  counts = {}
  for split in ('train', 'test'):
    with h5py.File(out / f'ply_data_{split}0.h5', 'r') as f:
      assert f['data'].dtype == np.float32 and f['label'].dtype == np.uint8
      assert f['data'].shape[1:] == (2048, 3) and f['label'].shape[1] == 1
      counts[split] = np.bincount(f['label'][:, 0], minlength=3)
  np.testing.assert_array_equal(counts['train'] + counts['test'], [8, 8, 8])
  assert summary['counts'] == {'train': int(counts['train'].sum()),
                               'test': int(counts['test'].sum())}
  assert all(c['test'] == 2 for c in summary['per_class'].values())
  assert summary['majority_class_rate_test'] == pytest.approx(1 / 3)
  chamfer = json.loads((out / 'chamfer.json').read_text())
  assert chamfer == summary['chamfer']
  floor = chamfer['same_model_two_samples_floor']['p50']
  assert 0 < floor < chamfer['test_to_nearest_train']['p50']
  # Flat, tall and long boxes: the nearest train cloud has the same class.
  assert chamfer['test_1nn_label_agreement'] == 1.0


def test_builder_reads_the_set_through_the_config(prepared):
  out, summary = prepared
  config = modelnet40_config.get_config('data=kicad')
  assert config.data.manual_dir == 'workdirs/data/kicad'
  assert config.data.num_classes == config.model.num_classes
  config.data.update(manual_dir=str(out), data_dir=str(out / 'tfds'),
                     num_classes=3)
  kwargs = config.data.to_dict()
  assert modelnet40.num_examples('train', **kwargs) == summary['counts']['train']
  assert modelnet40.class_names(**kwargs) == ('Flat', 'Long', 'Tall')
  batches = list(modelnet40.load('test', batch_size=4, is_training=False,
                                 **kwargs))
  labels = np.concatenate([b['labels'][b['mask']] for b in batches])
  np.testing.assert_array_equal(np.bincount(labels), [2, 2, 2])
  inputs = np.concatenate([b['inputs'][b['mask']] for b in batches])
  np.testing.assert_allclose(np.abs(inputs).max((1, 2)), 1, atol=1e-6)
  kwargs['num_classes'] = 43
  with pytest.raises(ValueError, match='have 3 classes .*not num_classes=43'):
    modelnet40.num_examples('test', **kwargs)
