"""torch.export programs (``.pt2``) -> an ``nn.Module`` whose layers keep the source module paths.

Modules: ``archive`` (``sanitized_copy``: the archive screened member by member), ``operators`` (the
allow-list of what a graph node may call), ``expressions`` (the grammar of symbolic shape expressions),
``modules`` (Conv/BatchNorm/Sequential types restored), ``file`` (``load``, ``load_pt2_file``).

``torch.export.load`` trusts its archive: it deserializes *every* program in it, loads pickled weights,
constants and sample inputs with ``torch.load(weights_only=False)``, hands symbolic shape expressions to
``sympy.sympify`` (i.e. ``eval``) and resolves any ``torch.*`` name as an operator. So an untrusted archive
never reaches it. ``sanitized_copy`` reads every member itself and writes a new archive holding only what
a plain program needs -- one program (``models/model.json``), its weights and constants as raw tensor
bytes, no sample inputs, no guard code, no extra members -- after checking that:

- the archive holds exactly one program and no pickles, compiled code (AOTInductor) or custom objects;
- every JSON member is below ``MAX_JSON_BYTES`` and ``MAX_JSON_DEPTH`` levels, its integers within int64;
- every raw tensor's dtype, layout, device and (size, stride, offset) fit the bytes of its record;
- every graph node calls a pure tensor operator (``operators.ATEN_OPS``, ``PRIMS_OPS``) whose schema writes no
  argument (no ``out=``, no in-place), or plain arithmetic on sizes (``_operator``, ``math``, ``torch.sym_*``),
  or one of the two wrappers export emits around ``no_grad``/``autocast`` blocks;
- literal sizes in the graph allocate at most ``MAX_LITERAL_ELEMENTS`` elements;
- every symbolic expression is one of the sympy constructors torch writes, with literals of at most
  62 bits, small literal exponents and constant parts below ``MAX_EXPR_BITS`` bits (``check_expr``).

Sample inputs are ignored: input shapes and dtypes come from the graph's placeholders (``load_pt2_file``).

``torch.export.unflatten`` rebuilds the module tree (``features.0``, ``classifier.1``) with graph-carrying
leaves. ``load`` then gives Conv and BatchNorm leaves back their ``nn`` types and chains back their
``nn.Sequential`` type, so BatchNorm folding and layer discovery treat the program like the source model.
"""


class Refused(Exception):
    """Why an archive is refused (completed into one QcoreError line by ``sanitized_copy``)."""

