"""``python -m qcore memory``: the memory calculator (``qcore.analysis.memory``) on the command line.

Kept beside ``cli`` (which imports ``add_command`` into ``_EXTRA_COMMANDS``) so that module stays readable.
"""

from __future__ import annotations


def cmd_memory(args):
    from qcore.analysis import memory
    from qcore.cli import _table, resolve_workload  # qcore.cli imports this module: its helpers are read at run time

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if args.params is not None:
        shape = memory.LMShape(f"a {args.params:.3g}-parameter model", args.layers, 0, args.kv_heads, args.kv_heads,
                               args.head_dim, 0, 0, params=int(args.params))
    elif args.model in memory.REFERENCE_MODELS:
        shape = memory.REFERENCE_MODELS[args.model]
    else:
        w = resolve_workload(args.model, None, args.trust_pickle)
        shape = memory.workload_shape(w)
    rows = memory.memory_table(shape, formats, args.group_size, args.context, args.batch, args.kv_format,
                               args.kv_granularity)
    shown = [{k: r[k] for k in ("format", "weight_gb", "kv_cache_gb", "total_gb")} for r in rows]
    return rows, (f"{shape.name}: {shape.param_count:,} parameters; {shape.layers} layers x {shape.kv_heads} KV heads x "
                  f"{shape.head_dim} (GB = 10^9 bytes; an estimate from shapes, not a measurement)\n" + _table(shown)
                  + f"\nincludes: {rows[0]['includes']}")


def add_command(command):
    from qcore.analysis.memory import REFERENCE_MODELS, WEIGHT_FORMATS
    from qcore.cli import _count

    c = command("memory", cmd_memory, "memory calculator: weight and KV-cache bytes of a language model at each format")
    c.add_argument("--model", default="7B", help=f"a reference shape ({', '.join(REFERENCE_MODELS)}), a zoo language "
                                                 "model or a Hugging Face folder (default 7B)")
    c.add_argument("--params", type=float, help="a nominal parameter count instead of --model, e.g. 1e9")
    c.add_argument("--layers", type=_count(10**4), default=32, help="with --params: layers (for the KV cache)")
    c.add_argument("--kv-heads", type=_count(10**4), default=32, help="with --params: KV heads")
    c.add_argument("--head-dim", type=_count(10**5), default=128, help="with --params: head size")
    c.add_argument("--format", default=",".join(WEIGHT_FORMATS), help="weight formats, comma-separated")
    c.add_argument("--group-size", type=_count(2**20), default=None, help="count a float32 scale per this many weights")
    c.add_argument("--context", type=_count(10**8), default=4096, help="tokens in the KV cache")
    c.add_argument("--batch", type=_count(10**5), default=1, help="sequences in the KV cache")
    c.add_argument("--kv-format", default="fp16")
    c.add_argument("--kv-granularity", choices=["per_token", "per_head"], default=None,
                   help="count the KV cache's float32 scales (default: codes only)")
