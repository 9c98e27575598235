"""A VRML97 (VRML 2.0) reader for triangle meshes: `read_triangles(path)`.

Shapes: T triangles, N points of one face set.

Reads what CAD exporters (KiCad StepUp, VCGLIB, Cinema-4D-style grouped
files) write: nodes `[DEF name] Type { field value ... }`, `USE name`,
`#` comments, commas as white space, CR/LF line ends. Geometry comes from
`Shape { geometry IndexedFaceSet { coord Coordinate { point [...] }
coordIndex [...] } }`; each -1-terminated polygon of k >= 3 vertices is
fan-triangulated into k - 2 triangles (v0, vi, vi+1); shorter polygons are
dropped. Grouping nodes are walked with their transforms:

  Transform   P' = T C R SR S SR^-1 C^-1 P (translation, center, rotation
              axis-angle, scaleOrientation, scale), nested in `children`;
  Group, Anchor, Billboard, Collision: their `children`;
  Switch      choice[whichChoice] (none when whichChoice is -1);
  LOD         its first (most detailed) level.

A `USE`d node is the `DEF`d node again, drawn under the transform of the
place it is used. Other geometry (IndexedLineSet, PointSet, Box, Text, ...)
has no listed faces and is skipped; nodes that draw nothing (Appearance,
NavigationInfo, ...) are parsed and ignored. Numeric arrays are parsed with
numpy in one call per array. A file that is not VRML 2.0 text, is malformed,
uses an undefined name, or indexes a point that does not exist raises one
`VrmlError` naming the file and the reason.
"""
import math
import re
import warnings
from typing import Optional

import numpy as np

_TOKEN = re.compile(
    r'(?:[\s,]+|#[^\n]*)*'  # white space (commas included) and comments
    r'([{}\[\]]|"(?:[^"\\]|\\.)*"|[^\s,{}\[\]#"]+)?')
_NUMBER_START = set('0123456789+-.')
_MF_NODE_FIELDS = frozenset({'children', 'choice', 'level', 'addChildren',
                             'removeChildren'})
_PARSED_ARRAYS = frozenset({'point', 'coordIndex'})  # others stay text
_GROUPS = frozenset({'Group', 'Transform', 'Anchor', 'Billboard', 'Collision'})
_IDENTITY = np.eye(4)  # the top level's transform (tested by identity)


class VrmlError(ValueError):
  """A VRML file that cannot be read, with the file and the reason."""


class _Node:
  __slots__ = ('type', 'fields')

  def __init__(self, node_type):
    self.type = node_type
    self.fields = {}


class _Parser:
  """Recursive descent over the text; arrays are cut out and parsed whole."""

  def __init__(self, text):
    self.text = text
    self.pos = 0
    self.defs = {}

  def _next(self):
    """The next token (None at the end) and moves past it."""
    m = _TOKEN.match(self.text, self.pos)
    self.pos = m.end()
    return m.group(1)

  def _peek(self):
    m = _TOKEN.match(self.text, self.pos)
    return m.group(1)

  def _expect(self, token):
    got = self._next()
    if got != token:
      raise ValueError(f'expected {token!r} at character {self.pos}, '
                       f'found {got!r}')

  def statements(self):
    nodes = []
    while (token := self._peek()) is not None:
      if token in ('PROTO', 'EXTERNPROTO'):
        raise ValueError(f'{token} (prototypes) are not supported')
      if token == 'ROUTE':  # ROUTE a.b TO c.d: no geometry.
        for _ in range(4):
          self._next()
        continue
      nodes.append(self.node())
    return nodes

  def node(self) -> Optional[_Node]:
    token = self._next()
    if token == 'NULL':
      return None
    if token == 'USE':
      name = self._next()
      if name not in self.defs:
        raise ValueError(f'USE {name} before any DEF {name}')
      return self.defs[name]
    name = None
    if token == 'DEF':
      name, token = self._next(), self._next()
    if token is None or not (token[0].isalpha() or token[0] == '_'):
      raise ValueError(f'expected a node type at character {self.pos}, '
                       f'found {token!r}')
    node = _Node(token)
    if name is not None:
      self.defs[name] = node  # Before the body: the name is bound here.
    self._expect('{')
    while (field := self._next()) != '}':
      if field is None:
        raise ValueError(f'unclosed {{ of {node.type} at the end of the file')
      node.fields[field] = self.value(field)
    return node

  def value(self, field):
    token = self._peek()
    if token == '[':
      if field in _MF_NODE_FIELDS:
        self._next()
        nodes = []
        while self._peek() != ']':
          if self._peek() is None:
            raise ValueError(f'unclosed [ of {field} at the end of the file')
          nodes.append(self.node())
        self._next()
        return nodes
      return self.array(field)
    if token is None:
      raise ValueError(f'field {field} has no value at the end of the file')
    if token in ('DEF', 'USE', 'NULL') or token[0].isalpha() and token not in (
        'TRUE', 'FALSE'):
      node = self.node()
      return [node] if field in _MF_NODE_FIELDS else node
    values = []  # numbers, TRUE/FALSE, strings: up to the next field name
    while token is not None and token not in '{}[]' and (
        token[0] in _NUMBER_START or token[0] == '"' or
        token in ('TRUE', 'FALSE')):
      values.append(self._next())
      token = self._peek()
    if not values:
      raise ValueError(f'field {field} has no value at character {self.pos}')
    return values

  def array(self, field):
    """[ ... ] of numbers or strings: parsed for `_PARSED_ARRAYS`."""
    self._next()
    end = self.text.find(']', self.pos)
    if end < 0:
      raise ValueError(f'unclosed [ of {field} at character {self.pos}')
    body = self.text[self.pos:end]
    self.pos = end + 1
    if field not in _PARSED_ARRAYS:
      return body
    body = body.replace(',', ' ')
    if '#' in body:
      body = re.sub(r'#[^\n]*', ' ', body)
    dtype = np.float64 if field == 'point' else np.int64
    with warnings.catch_warnings():
      warnings.simplefilter('error')  # numpy warns where it stops early.
      try:
        values = np.fromstring(body, dtype=dtype, sep=' ')
      except (ValueError, DeprecationWarning):
        bad = next((t for t in body.split() if not _is_number(t, dtype)), '')
        raise ValueError(f'{field} holds {bad[:40]!r}, not a number') from None
    return values


def _is_number(text, dtype):
  try:
    dtype(text) if dtype is np.float64 else int(text)
    return True
  except ValueError:
    return False


def _floats(node, field, count, default):
  values = node.fields.get(field)
  if values is None:
    return np.asarray(default, np.float64)
  if not isinstance(values, list) or len(values) != count:
    raise ValueError(f'{node.type}.{field} needs {count} numbers, got '
                     f'{values!r}'[:200])
  try:
    return np.asarray([float(v) for v in values], np.float64)
  except ValueError:
    raise ValueError(f'{node.type}.{field} is not numeric: {values}') from None


def rotation_matrix(axis_angle) -> np.ndarray:
  """VRML SFRotation (x, y, z, angle) -> [3, 3] (Rodrigues, right-handed)."""
  axis, angle = np.asarray(axis_angle[:3], np.float64), float(axis_angle[3])
  norm = np.linalg.norm(axis)
  if norm == 0 or angle == 0:
    return np.eye(3)
  x, y, z = axis / norm
  k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
  return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _affine(linear=None, shift=None):
  m = np.eye(4)
  if linear is not None:
    m[:3, :3] = linear
  if shift is not None:
    m[:3, 3] = shift
  return m


def transform_matrix(node) -> np.ndarray:
  """Transform node -> [4, 4], P' = T C R SR S SR^-1 C^-1 P."""
  t = _floats(node, 'translation', 3, (0, 0, 0))
  c = _floats(node, 'center', 3, (0, 0, 0))
  r = rotation_matrix(_floats(node, 'rotation', 4, (0, 0, 1, 0)))
  sr = rotation_matrix(_floats(node, 'scaleOrientation', 4, (0, 0, 1, 0)))
  s = np.diag(_floats(node, 'scale', 3, (1, 1, 1)))
  return (_affine(shift=t) @ _affine(shift=c) @ _affine(r) @ _affine(sr) @
          _affine(s) @ _affine(sr.T) @ _affine(shift=-c))


def fan_triangles(coord_index: np.ndarray) -> np.ndarray:
  """-1-terminated polygons -> [T, 3] vertex ids (v0, vi, vi+1)."""
  index = np.asarray(coord_index, np.int64)
  if index.size == 0:
    return np.zeros((0, 3), np.int64)
  if index[-1] != -1:
    index = np.append(index, -1)
  if len(index) % 4 == 0 and (index[3::4] == -1).all():  # all triangles
    return index.reshape(-1, 4)[:, :3]
  ends = np.flatnonzero(index == -1)
  starts = np.concatenate([[0], ends[:-1] + 1])
  per_polygon = np.maximum(ends - starts - 2, 0)  # triangles per polygon
  polygon = np.repeat(np.arange(len(starts)), per_polygon)  # [T]
  k = np.arange(len(polygon)) - np.repeat(np.cumsum(per_polygon) - per_polygon,
                                          per_polygon)  # [T] 0..k-3
  first = starts[polygon]
  return np.stack([index[first], index[first + 1 + k], index[first + 2 + k]],
                  axis=1)


def _face_set_triangles(node, matrix):
  coord = node.fields.get('coord')
  if not isinstance(coord, _Node):
    return None
  points = coord.fields.get('point')
  index = node.fields.get('coordIndex')
  if points is None or index is None or isinstance(points, str):
    return None
  if isinstance(index, list):  # a single index written without brackets
    index = np.asarray([int(float(v)) for v in index], np.int64)
  if len(points) % 3:
    raise ValueError(f'{len(points)} point coordinates, not a multiple of 3')
  points = points.reshape(-1, 3)  # [N, 3]
  faces = fan_triangles(index)  # [T, 3]
  if len(faces) == 0:
    return None
  if faces.min() < 0 or faces.max() >= len(points):
    raise ValueError(f'coordIndex {int(faces.max())} or {int(faces.min())} '
                     f'outside the {len(points)} points')
  if matrix is not _IDENTITY:
    points = points @ matrix[:3, :3].T + matrix[:3, 3]  # [N, 3] world
  return points[faces]  # [T, 3, 3]


def _walk(nodes, matrix, out, depth=0):
  if depth > 200:
    raise ValueError('nodes nested more than 200 deep (a USE cycle?)')
  for node in nodes:
    if node is None:
      continue
    if node.type == 'Shape':
      geometry = node.fields.get('geometry')
      if isinstance(geometry, _Node) and geometry.type == 'IndexedFaceSet':
        triangles = _face_set_triangles(geometry, matrix)
        if triangles is not None:
          out.append(triangles)
    elif node.type in _GROUPS:
      inner = matrix @ transform_matrix(node) if node.type == 'Transform' \
          else matrix
      _walk(_children(node, 'children'), inner, out, depth + 1)
    elif node.type == 'Switch':
      choice = _children(node, 'choice')
      which = int(float(node.fields.get('whichChoice', ['-1'])[0]))
      if 0 <= which < len(choice):
        _walk([choice[which]], matrix, out, depth + 1)
    elif node.type == 'LOD':
      _walk(_children(node, 'level')[:1], matrix, out, depth + 1)


def _children(node, field):
  value = node.fields.get(field, [])
  if isinstance(value, str):  # '[ ]' parsed as an (empty) value array
    return []
  return value if isinstance(value, list) else [value]


def parse_triangles(text: str, name: str = '<string>') -> np.ndarray:
  """VRML 2.0 text -> float32 [T, 3, 3] triangles in world coordinates.

  Raises VrmlError naming `name` and the reason if the text does not parse.
  """
  if not text.startswith('#VRML V2.0'):
    raise VrmlError(f'VRML file {name}: does not start with "#VRML V2.0" '
                    f'(found {text[:20]!r}).')
  try:
    parser = _Parser(text)
    out = []
    _walk(parser.statements(), _IDENTITY, out)
  except (ValueError, RecursionError) as e:
    raise VrmlError(f'VRML file {name}: {e}.') from None
  if not out:
    return np.zeros((0, 3, 3), np.float32)
  return np.concatenate(out).astype(np.float32)


def read_triangles(path: str) -> np.ndarray:
  """Reads a .wrl file -> float32 [T, 3, 3]; VrmlError if it does not parse."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise VrmlError(f'VRML file {path}: unreadable ({e.strerror}).') from None
  # Only names and comments may be non-ASCII; numbers and keywords are ASCII.
  text = data.decode('utf-8', errors='replace')
  return parse_triangles(text, path)
