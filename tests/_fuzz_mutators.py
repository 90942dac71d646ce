"""Seeded mutators for the fuzz suite: each takes a good file's bytes and a ``random.Random`` and
returns ``(mutated bytes, description)``. The description names the operation, the field and the
value, so a failing case can be read without rerunning it; the (target, seed, case) triple that
made the Random reproduces it exactly.

Binary formats are mutated at parsed offsets (lengths, counts, dims, types, offsets) as well as by
blind byte flips and truncations, because blind flips in a file that is mostly tensor data rarely
reach the header. JSON and YAML are mutated as values (types, extreme numbers, deep nesting,
missing and unknown keys) and as text (non-UTF-8, truncation, tags).
"""
from __future__ import annotations

import copy
import json
import random
import struct
from dataclasses import dataclass
from typing import Any

# ------------------------------------------------------------------ raw-text placeholders
# Values json/yaml cannot or will not write are dumped as a marker string, then the marker is
# replaced by the raw text (a 5000-digit integer passes Python's int-to-str limit this way).
HUGE_INT_TEXT = "9" * 5000
DEEP_JSON_TEXT = "[" * 100_000 + "]" * 100_000


class Raw:
    """A value written as this exact text in place of a JSON/YAML value."""

    def __init__(self, text: str, label: str) -> None:
        self.text = text
        self.label = label

    def __repr__(self) -> str:
        return self.label


def _replace_raws(obj: Any, raws: list[Raw]) -> Any:
    if isinstance(obj, Raw):
        raws.append(obj)
        return f"@@FUZZRAW{len(raws) - 1}@@"
    if isinstance(obj, dict):
        return {key: _replace_raws(value, raws) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_replace_raws(value, raws) for value in obj]
    return obj


def dump_json(obj: Any, indent: int | None = 2) -> str:
    raws: list[Raw] = []
    text = json.dumps(_replace_raws(obj, raws), indent=indent)  # allow_nan: NaN/Infinity on purpose
    for index, raw in enumerate(raws):
        text = text.replace(f'"@@FUZZRAW{index}@@"', raw.text)
    return text


def dump_yaml(obj: Any) -> str:
    import yaml

    raws: list[Raw] = []
    text = yaml.safe_dump(_replace_raws(obj, raws), sort_keys=False, allow_unicode=True, width=10_000)
    for index, raw in enumerate(raws):
        for quoted in (f"'@@FUZZRAW{index}@@'", f'"@@FUZZRAW{index}@@"', f"@@FUZZRAW{index}@@"):
            text = text.replace(quoted, raw.text)
    return text


# ------------------------------------------------------------------ value pools
INT_VALUES: list[Any] = [0, -1, 1, 2, 3, 7, 31, 255, 65535, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63,
                         2**64, 10**12, -10**12, -(2**63)]
ODD_VALUES: list[Any] = [None, True, False, "", "abc", "2", "1e400", "nan", [], {}, [1, 2], [[1]], {"a": 1},
                         1.5, -0.0, 1e-300, 1e308, float("nan"), float("inf"), float("-inf"),
                         "\x1b[2J\x00name", "\u202e\u0000", "x" * 100_000,
                         Raw(HUGE_INT_TEXT, "<5000-digit int>"), Raw("-" + HUGE_INT_TEXT, "<-5000-digit int>"),
                         Raw("1e400", "1e400"), Raw("-1e400", "-1e400"), Raw(DEEP_JSON_TEXT, "<100000-deep list>")]
DTYPE_NAMES = ["float32", "float16", "bfloat16", "float128", "float64", "int8", "uint8", "bool", "complex64",
               "float8_e4m3fn", "auto", "", "torch.float16", "F16", "BF16"]
ARCH_NAMES = ["llama", "mistral", "qwen2", "gpt2", "bert", "mixtral", "gemma", "", "LLAMA", "llama\x00", "../llama"]


def interesting_value(rng: random.Random, key: str | None = None, pools: dict[str, list[Any]] | None = None) -> Any:
    """A value to put where a good one was: the key's own pool first, else ints or odd values."""
    if pools and key in pools and rng.random() < 0.6:
        return rng.choice(pools[key])
    return rng.choice(INT_VALUES) if rng.random() < 0.4 else rng.choice(ODD_VALUES)


# ------------------------------------------------------------------ structured (JSON / YAML) mutation
def _paths(obj: Any, prefix: tuple = (), limit: int = 5000) -> list[tuple]:
    """Every node's path (dict keys, list indices), breadth first, at most ``limit``."""
    found: list[tuple] = []
    queue: list[tuple[tuple, Any]] = [(prefix, obj)]
    while queue and len(found) < limit:
        path, node = queue.pop(0)
        found.append(path)
        if isinstance(node, dict):
            queue += [((*path, key), value) for key, value in node.items()]
        elif isinstance(node, list):
            queue += [((*path, index), value) for index, value in enumerate(node[:64])]
    return found


def _get(obj: Any, path: tuple) -> Any:
    for step in path:
        obj = obj[step]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(obj, path[:-1])[path[-1]] = value
    return obj


def mutate_tree(obj: Any, rng: random.Random, *, pools: dict[str, list[Any]] | None = None,
                focus_keys: list[str] | None = None, unknown_key: str = "fuzz_unknown") -> tuple[Any, str]:
    """One value-level edit of a parsed JSON/YAML document (a deep copy is edited)."""
    obj = copy.deepcopy(obj)
    paths = _paths(obj)
    focused = [path for path in paths if path and focus_keys and path[-1] in focus_keys]
    path = rng.choice(focused) if focused and rng.random() < 0.6 else rng.choice(paths)
    key = path[-1] if path and isinstance(path[-1], str) else None
    shown = "/".join(str(step) for step in path) or "<root>"
    op = rng.choices(["replace", "delete", "add", "wrap"], weights=[70, 12, 10, 8])[0]
    parent = _get(obj, path[:-1]) if path else None
    if op == "delete" and path:
        del parent[path[-1]]
        return obj, f"delete {shown}"
    if op == "add":
        node = _get(obj, path)
        value = interesting_value(rng, None, pools)
        if isinstance(node, dict):
            node[unknown_key] = value
            return obj, f"add {shown}/{unknown_key}={value!r:.60}"
        if isinstance(node, list):
            node.append(value)
            return obj, f"append to {shown}: {value!r:.60}"
    if op == "wrap":
        value = _get(obj, path)
        wrapped = rng.choice([[value], {"value": value}, [[[[value]]]]])
        return _set(obj, path, wrapped), f"wrap {shown} in {type(wrapped).__name__}"
    value = interesting_value(rng, key, pools)
    return _set(obj, path, value), f"set {shown}={value!r:.60}"


def mutate_text(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A text-level edit of a JSON/YAML document."""
    op = rng.choice(["truncate", "non-utf8", "flip", "empty", "bom", "duplicate", "nul"])
    if op == "truncate":
        cut = rng.randrange(len(raw) + 1)
        return raw[:cut], f"truncate at {cut}/{len(raw)}"
    if op == "non-utf8":
        at = rng.randrange(len(raw) + 1)
        junk = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])
        return raw[:at] + junk + raw[at:], f"insert {junk!r} at {at}"
    if op == "flip":
        data = bytearray(raw)
        positions = [rng.randrange(len(data)) for _ in range(rng.randint(1, 4))] if data else []
        for at in positions:
            data[at] ^= 1 << rng.randrange(8)
        return bytes(data), f"flip bits at {positions}"
    if op == "empty":
        return b"", "empty file"
    if op == "bom":
        return b"\xef\xbb\xbf" + raw, "UTF-8 BOM prefix"
    if op == "nul":
        at = rng.randrange(len(raw) + 1)
        return raw[:at] + b"\x00" + raw[at:], f"NUL at {at}"
    return raw + raw, "document twice"


def mutate_json_file(raw: bytes, rng: random.Random, *, pools: dict[str, list[Any]] | None = None,
                     focus_keys: list[str] | None = None) -> tuple[bytes, str]:
    roll = rng.random()
    if roll < 0.12:
        return mutate_text(raw, rng)
    if roll < 0.18:
        top = rng.choice([Raw("null", "null"), Raw("[]", "[]"), Raw("1", "1"), Raw('"x"', '"x"'),
                          Raw(DEEP_JSON_TEXT, "<100000-deep list>"),
                          Raw('{"a":' * 50_000 + "1" + "}" * 50_000, "<50000-deep object>")])
        return top.text.encode(), f"whole document replaced by {top.label}"
    obj = json.loads(raw)
    edits = []
    for _ in range(1 if rng.random() < 0.75 else rng.randint(2, 4)):
        obj, edit = mutate_tree(obj, rng, pools=pools, focus_keys=focus_keys)
        edits.append(edit)
    return dump_json(obj).encode("utf-8", errors="surrogatepass"), "; ".join(edits)


# ------------------------------------------------------------------ GGUF
@dataclass(frozen=True)
class Field:
    kind: str      # what the bytes mean: "kv key length", "tensor dim", ...
    offset: int
    fmt: str       # struct format of the field ("<Q", "<I", "<f", ...) or "bytes:N" for string contents
    label: str     # which key / tensor it belongs to


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}


class GGUFLayout:
    """The offsets of every header field of a well-formed GGUF (the seed), for targeted edits."""

    def __init__(self, data: bytes) -> None:
        self.fields: list[Field] = []
        self.data = data
        pos = 4
        self.fields.append(Field("version", pos, "<I", "header"))
        self.fields.append(Field("tensor count", pos + 4, "<Q", "header"))
        self.fields.append(Field("kv count", pos + 12, "<Q", "header"))
        _, tensor_count, kv_count = struct.unpack_from("<IQQ", data, pos)
        pos += 20
        for _ in range(kv_count):
            key, pos = self._string(pos, "kv key", None)
            self.fields.append(Field("kv value type", pos, "<I", key))
            (type_id,) = struct.unpack_from("<I", data, pos)
            pos = self._value(pos + 4, type_id, key, record=True)
        for _ in range(tensor_count):
            name, pos = self._string(pos, "tensor name", None)
            self.fields.append(Field("tensor n_dims", pos, "<I", name))
            (n_dims,) = struct.unpack_from("<I", data, pos)
            pos += 4
            for _ in range(n_dims):
                self.fields.append(Field("tensor dim", pos, "<Q", name))
                pos += 8
            self.fields.append(Field("tensor type", pos, "<I", name))
            self.fields.append(Field("tensor offset", pos + 4, "<Q", name))
            pos += 12
        self.header_end = pos
        self.by_kind: dict[str, list[Field]] = {}
        for field in self.fields:
            self.by_kind.setdefault(field.kind, []).append(field)

    def _string(self, pos: int, kind: str, label: str | None, record: bool = True) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", self.data, pos)
        text = self.data[pos + 8:pos + 8 + length].decode("utf-8", errors="replace")
        if record:
            self.fields.append(Field(f"{kind} length", pos, "<Q", label or text))
            self.fields.append(Field(f"{kind} bytes", pos + 8, f"bytes:{length}", label or text))
        return text, pos + 8 + length

    def _value(self, pos: int, type_id: int, key: str, record: bool) -> int:
        if type_id in _GGUF_SCALAR:
            if record:
                self.fields.append(Field("kv scalar value", pos, _GGUF_SCALAR[type_id], key))
            return pos + struct.calcsize(_GGUF_SCALAR[type_id])
        if type_id == 8:
            return self._string(pos, "kv string", key, record)[1]
        elem_type, count = struct.unpack_from("<IQ", self.data, pos)
        if record:
            self.fields.append(Field("kv array element type", pos, "<I", key))
            self.fields.append(Field("kv array count", pos + 4, "<Q", key))
        pos += 12
        if elem_type in _GGUF_SCALAR:
            size = struct.calcsize(_GGUF_SCALAR[elem_type])
            if record and count:
                for index in (0, count - 1):
                    self.fields.append(Field("kv array element", pos + index * size, _GGUF_SCALAR[elem_type],
                                             f"{key}[{index}]"))
            return pos + count * size
        for index in range(count):
            # Only the first and last few elements of a 49152-token array are worth targeting.
            pos = self._value(pos, elem_type, f"{key}[{index}]", record and (index < 3 or index >= count - 2))
        return pos


_INT_LIMITS = {"<B": 8, "<b": 8, "<H": 16, "<h": 16, "<I": 32, "<i": 32, "<Q": 64, "<q": 64, "<?": 8}
_FLOAT_VALUES = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e30, -1e30, 1e-45, 3.4e38]
_GGML_TYPE_VALUES = [0, 1, 2, 3, 6, 8, 10, 12, 14, 16, 30, 39, 40, 255, 2**31, 2**32 - 1]
_VALUE_TYPE_VALUES = [0, 4, 6, 7, 8, 9, 10, 12, 13, 255, 2**32 - 1]


def _int_candidates(field: Field, current: int, bits: int) -> list[int]:
    mask = (1 << bits) - 1
    values = [0, 1, 2, 3, current + 1, current - 1, current * 2, current // 2, current + 32, current - 32,
              mask, mask >> 1, (mask >> 1) + 1, 1 << (bits // 2), 64, 65, 4096, 2**31, 2**40]
    if field.kind == "tensor type":
        values += _GGML_TYPE_VALUES
    if field.kind in ("kv value type", "kv array element type"):
        values += _VALUE_TYPE_VALUES
    if field.kind == "version":
        values += [1, 2, 3, 4, 99]
    return [value & mask for value in values]


def _edit_field(data: bytearray, field: Field, rng: random.Random) -> str:
    if field.fmt.startswith("bytes:"):
        length = int(field.fmt[6:])
        if not length:
            return f"{field.kind} of {field.label!r:.40}: empty, left alone"
        payload = rng.choice([b"\x1b[2J", b"\x00", b"\xff\xfe", b"\xed\xa0\x80", b"/", b"*", b"."])
        at = field.offset + rng.randrange(length)
        payload = payload[:field.offset + length - at]
        data[at:at + len(payload)] = payload
        return f"{field.kind} of {field.label!r:.40}: {payload!r} at {at}"
    size = struct.calcsize(field.fmt)
    (current,) = struct.unpack_from(field.fmt, data, field.offset)
    if field.fmt in ("<f", "<d"):
        value = rng.choice(_FLOAT_VALUES)
        struct.pack_into(field.fmt, data, field.offset, value)
    else:
        bits = _INT_LIMITS[field.fmt]
        value = rng.choice(_int_candidates(field, int(current), bits))
        data[field.offset:field.offset + size] = value.to_bytes(size, "little")
    return f"{field.kind} of {field.label!r:.40} at {field.offset}: {current!r} -> {value!r}"


def mutate_gguf(seed: bytes, layout: GGUFLayout, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(seed)
    op = rng.choices(["field", "flip", "truncate", "splice", "rename"], weights=[55, 15, 12, 10, 8])[0]
    if op == "field":
        edits = []
        for _ in range(1 if rng.random() < 0.8 else 2):
            kind = rng.choice(sorted(layout.by_kind))
            edits.append(_edit_field(data, rng.choice(layout.by_kind[kind]), rng))
        return bytes(data), "field: " + "; ".join(edits)
    if op == "flip":
        end = layout.header_end if rng.random() < 0.85 else len(data)
        positions = sorted(rng.randrange(end) for _ in range(rng.randint(1, 6)))
        for at in positions:
            data[at] ^= rng.randrange(1, 256)
        return bytes(data), f"flip bytes at {positions} (header ends at {layout.header_end})"
    if op == "truncate":
        if rng.random() < 0.5:
            cut = rng.choice(layout.fields).offset + rng.randrange(0, 9)
        else:
            cut = rng.randrange(len(data))
        return bytes(data[:cut]), f"truncate at {cut}/{len(data)}"
    if op == "splice":
        field = rng.choice(layout.fields)
        if rng.random() < 0.5:
            count = rng.choice([1, 4, 8, 31, 32])
            del data[field.offset:field.offset + count]
            return bytes(data), f"delete {count} bytes at {field.kind} of {field.label!r:.40} ({field.offset})"
        junk = rng.choice([b"\x00" * 8, b"\xff" * 8, b"\x01", bytes(32)])
        data[field.offset:field.offset] = junk
        return bytes(data), f"insert {junk!r:.20} at {field.kind} of {field.label!r:.40} ({field.offset})"
    # rename: a tensor name or key replaced by a hostile one of another length (later offsets shift)
    field = rng.choice(layout.by_kind.get("tensor name length", []) + layout.by_kind.get("kv key length", []))
    (length,) = struct.unpack_from("<Q", data, field.offset)
    name = rng.choice([b"\x1b[2J\x1b[31mred", b"a\x00b", b"x" * 70_000, b"", b"\xff\xfe\xfd",
                       field.label.encode()[:-1] or b"q", b"../../etc/passwd", "ünïcødé".encode()])
    data[field.offset:field.offset + 8 + length] = struct.pack("<Q", len(name)) + name
    return bytes(data), f"rename {field.kind[:-7]} {field.label!r:.40} to {name!r:.40} ({len(name)} bytes)"


# ------------------------------------------------------------------ safetensors
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                      "U64", "C64", "F4", "Q4_0", "", "f32", "bf16"]
SAFETENSORS_POOLS: dict[str, list[Any]] = {
    "dtype": SAFETENSORS_DTYPES,
    "shape": [[], [0], [-1, 64], [2**63, 1], [2**32, 2**32], [64], [1, 1, 1, 1, 1, 1, 1, 1, 1], [64, 64, 64],
              ["64"], [1.5], [Raw(HUGE_INT_TEXT, "<5000-digit int>")], None, 64],
    "data_offsets": [[0, 0], [1, 0], [0, 2**63], [-8, 0], [0, 2**64], [0], [0, 1, 2], None, "0",
                     [Raw(HUGE_INT_TEXT, "<5000-digit int>"), 0], [1.5, 2.5]],
    "format": ["pt", "tf", "", None, 1, {"a": 1}],
}


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", raw, 0)
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_safetensors(header_text: bytes, body: bytes, length: int | None = None) -> bytes:
    header_text += b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text + body


def mutate_safetensors(seed: bytes, rng: random.Random) -> tuple[bytes, str]:
    header, body = split_safetensors(seed)
    (header_length,) = struct.unpack_from("<Q", seed, 0)
    names = [name for name in header if name != "__metadata__"]
    op = rng.choices(["header", "length", "rename", "gap", "flip", "truncate", "raw-json"],
                     weights=[45, 10, 12, 6, 10, 10, 7])[0]
    if op == "header":
        # Most edits hit one tensor's entry (dtype, shape, offsets); a few hit the whole header.
        focus = ["dtype", "shape", "data_offsets"]
        if rng.random() < 0.85:
            name = rng.choice(names)
            header[name], edit = mutate_tree(header[name], rng, pools=SAFETENSORS_POOLS, focus_keys=focus)
            edit = f"tensor {name!r}: {edit}"
        else:
            header, edit = mutate_tree(header, rng, pools=SAFETENSORS_POOLS, focus_keys=focus)
        text = dump_json(header, indent=None).encode("utf-8", errors="surrogatepass")
        keep_length = rng.random() < 0.15
        return join_safetensors(text, body, header_length if keep_length else None), \
            f"header: {edit}" + (" (old length kept)" if keep_length else "")
    if op == "length":
        value = rng.choice([0, 1, 2, 7, header_length - 1, header_length + 1, header_length + 8, len(seed),
                            len(seed) - 8, 2**32, 2**63, 2**64 - 1, 100 * 2**20])
        return struct.pack("<Q", value) + seed[8:], f"header length {header_length} -> {value}"
    if op == "rename":
        name = rng.choice(names)
        new_name = rng.choice(["\ud800", "\x1b[2J\x1b[31mred", "a\x00b", "x" * 100_000, "", "__metadata__",
                               rng.choice(names), "../../x", "model.layers.99999999999.mlp.up_proj.weight",
                               "model.layers.-1.mlp.up_proj.weight"])
        renamed = {(new_name if key == name else key): value for key, value in header.items()}
        if new_name in header and new_name != name:
            # Two entries with one name: only raw JSON text can say that.
            text = dump_json(header, indent=None).replace(json.dumps(name), json.dumps(new_name), 1)
        else:
            text = dump_json(renamed, indent=None)
        return join_safetensors(text.encode("utf-8", errors="surrogatepass"), body), \
            f"rename tensor {name!r} to {new_name!r:.40}"
    if op == "gap":
        shift = rng.choice([8, 16, 64])
        for name in names:
            start, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [start + shift, end + shift]
        return join_safetensors(dump_json(header, indent=None).encode(), bytes(shift) + body), \
            f"unreferenced {shift}-byte gap before the first tensor"
    if op == "flip":
        end = 8 + header_length if rng.random() < 0.8 else len(seed)
        data = bytearray(seed)
        positions = sorted(rng.randrange(end) for _ in range(rng.randint(1, 4)))
        for at in positions:
            data[at] ^= rng.randrange(1, 256)
        return bytes(data), f"flip bytes at {positions} (header ends at {8 + header_length})"
    if op == "truncate":
        cut = rng.randrange(8 + header_length + 64) if rng.random() < 0.6 else rng.randrange(len(seed))
        return seed[:cut], f"truncate at {cut}/{len(seed)}"
    text, edit = mutate_text(seed[8:8 + header_length].rstrip(b" "), rng)
    return join_safetensors(text, body), f"header text: {edit}"


# ------------------------------------------------------------------ config.json / index / YAML preset
CONFIG_POOLS: dict[str, list[Any]] = {
    "torch_dtype": DTYPE_NAMES, "dtype": DTYPE_NAMES, "model_type": ARCH_NAMES,
    "architectures": [["LlamaForCausalLM"], ["GPT2LMHeadModel"], [], ["LlamaForCausalLM", "X"], "LlamaForCausalLM",
                      [1]],
    "num_hidden_layers": [0, -1, 1, 3, 1_000_000_000, "2", 2.0, 2.5],
    "hidden_size": [0, -64, 1, 63, 65, 128, 10**12, "64"],
    "vocab_size": [0, -1, 1, 100, 49151, 49153, 10**12],
    "num_attention_heads": [0, -4, 3, 5, 64, 65],
    "num_key_value_heads": [0, 3, 4, 8, 5],
    "head_dim": [0, 15, 32, 17, 10**9],
    "intermediate_size": [0, 1, 127, 10**12],
    "rms_norm_eps": [float("nan"), 0, -1, float("inf"), 1e30],
    "rope_theta": [float("nan"), 0, -1, float("inf"), 1e300],
    "max_position_embeddings": [0, 1, -1, 2**40],
    "tie_word_embeddings": [True, "yes", 1, None],
    "rope_scaling": [{"rope_type": "linear", "factor": 0}, {"rope_type": "bogus"}, {"type": "yarn"}, "linear"],
    "hidden_act": ["relu", "bogus", "", None],
    "quantization_config": [{"quant_method": "bitsandbytes", "load_in_4bit": True}, {"quant_method": "gptq"},
                            {"quant_method": "compressed-tensors"}, {}, "x"],
    "auto_map": [{"AutoModelForCausalLM": "modeling_evil.Evil"}],
}
CONFIG_FOCUS = list(CONFIG_POOLS)


def mutate_config(seed: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.15:
        # Keys that the seed lacks (quantization_config, auto_map, rope_scaling) are added whole.
        config = json.loads(seed)
        key = rng.choice(["quantization_config", "auto_map", "rope_scaling", "dtype"])
        config[key] = rng.choice(CONFIG_POOLS[key])
        return dump_json(config).encode(), f"add {key}={config[key]!r:.60}"
    return mutate_json_file(seed, rng, pools=CONFIG_POOLS, focus_keys=CONFIG_FOCUS)


INDEX_FILE_NAMES = ["../config.json", "/etc/passwd", "model-00003-of-00002.safetensors", "", ".",
                    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json",
                    "tokenizer.json", "nested/dir.safetensors", "model.bin", "model.ckpt", "\x1b[2J.safetensors"]


def mutate_index(seed: bytes, rng: random.Random) -> tuple[bytes, str]:
    index = json.loads(seed)
    roll = rng.random()
    weight_map = index["weight_map"]
    names = list(weight_map)
    if roll < 0.25:
        name = rng.choice(names)
        weight_map[name] = rng.choice(INDEX_FILE_NAMES + [None, 1, ["a"], {"a": 1}])
        return dump_json(index).encode(), f"weight_map[{name!r}] = {weight_map[name]!r:.60}"
    if roll < 0.35:
        name = rng.choice(names)
        del weight_map[name]
        return dump_json(index).encode(), f"drop {name!r} from weight_map"
    if roll < 0.45:
        extra = rng.choice(["model.layers.7.mlp.up_proj.weight", "ghost.weight", "\x1b[2J", "x" * 50_000])
        weight_map[extra] = rng.choice(names and [weight_map[names[0]], weight_map[names[-1]]])
        return dump_json(index).encode(), f"add {extra!r:.40} to weight_map (no such tensor)"
    pools = {"total_size": [0, -1, 2**63, 10**30, "big", float("nan"), Raw(HUGE_INT_TEXT, "<5000-digit int>")],
             **{name: INDEX_FILE_NAMES for name in names}}
    return mutate_json_file(seed, rng, pools=pools, focus_keys=["weight_map", "metadata", "total_size"])


YAML_POOLS: dict[str, list[Any]] = {
    "scheme": ["nf4", "fp4", "int8-sym", "int4-asym", "Q4_K", "Q8_0", "Q6_K", "keep", "w8a8", "bogus", "", 4, None,
               ["nf4"], "F16", "IQ2_XXS"],
    "format": ["gguf", "safetensors", "onnx", "", 1, None, ["gguf"]],
    "params": [[1, 2], {"group_size": "abc"}, {"group_size": Raw("1e400", "1e400")}, {"block_size": 0},
               {"block_size": -64}, {"block_size": 3}, {"block_size": 2**40}, {"group_size": 7},
               {"group_size": Raw(HUGE_INT_TEXT, "<5000-digit int>")}, {"bogus_param": 1}, {"double_quant": "maybe"},
               {"smooth": float("nan")}, "x", None],
    "include": ["model.*", [["a"]], [1], [None], ["*"], "*", {"a": 1}, ["\x1b[2J"]],
    "skip": ["model.*", [["a"]], [1], ["*"], "*"],
    "rules": [[{"match": "*", "scheme": "Q4_K"}], [{"scheme": "Q4_K"}], [{"match": "*"}],
              [{"match": 1, "scheme": "Q4_K"}], [{"match": "*", "scheme": "Q4_K", "layers": "bogus"}],
              [{"match": "*", "scheme": "Q4_K", "layers": [1.5]}], [{"match": "*", "scheme": "Q4_K", "extra": 1}],
              [{"match": "*", "scheme": "Q4_K", "params": [1]}], ["x"], "x", {"match": "*"}],
    "match": ["*", "", 1, None, ["*"], "[", "model.layers.*"],
    "layers": ["more_bits", "bogus", [1.5], [-1], [10**12], 3, None],
    "group_size": [0, -1, 7, 2**31, "abc", Raw("1e400", "1e400"), Raw(".nan", ".nan"), Raw(".inf", ".inf")],
    "block_size": [0, -64, 3, 2**40, "64", Raw(".inf", ".inf")],
    "double_quant": ["maybe", 2, None],
}
YAML_TEXT_EDITS: list[tuple[str, str]] = [
    ("!!python/object/apply:os.system ['echo pwned > pwned.txt']\n", "python/object/apply tag (top)"),
    ("scheme: !!python/name:os.system\n", "python/name tag"),
    ("scheme: !!binary aGVsbG8=\n", "binary tag"),
    ("scheme: !custom nf4\n", "unknown local tag"),
    ("scheme: &a nf4\nformat: *a\n", "anchor and alias"),
    ("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ninclude: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", "billion-laughs aliases"),
    ("include: " + "[" * 10_000 + "]" * 10_000 + "\n", "10000-deep list"),
    ("scheme: nf4\nscheme: int8-sym\n", "duplicate key"),
    ("scheme: nf4\n---\nscheme: int8-sym\n", "two documents"),
    ("\tscheme: nf4\n", "tab indentation"),
    ("- scheme\n- nf4\n", "top-level list"),
    ("just a string\n", "top-level string"),
    ("null\n", "null document"),
    ("? [a, b]\n: nf4\n", "complex key"),
    ("params: {group_size: 0x7fffffffffffffffffff}\n", "hex huge int"),
    ("params: {block_size: 1_000_000_000_000}\n", "underscored huge int"),
]


def mutate_yaml(seed: bytes, rng: random.Random) -> tuple[bytes, str]:
    import yaml

    roll = rng.random()
    if roll < 0.25:
        text, label = rng.choice(YAML_TEXT_EDITS)
        if rng.random() < 0.5:
            return text.encode(), f"preset replaced by: {label}"
        return seed + b"\n" + text.encode(), f"appended: {label}"
    if roll < 0.4:
        return mutate_text(seed, rng)
    preset = yaml.safe_load(seed)
    edits = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        preset, edit = mutate_tree(preset, rng, pools=YAML_POOLS, focus_keys=list(YAML_POOLS))
        edits.append(edit)
    return dump_yaml(preset).encode("utf-8", errors="surrogatepass"), "; ".join(edits)
