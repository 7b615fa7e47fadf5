"""Loading and saving: the streamed writer, pending replacements, atomic writes, and a library that prints nothing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
from bnfold.errors import InputError
from bnfold.onnx.fold import fold_file, fold_onnx
from bnfold.onnx.io import load_model, load_model_with_info, save_model, write_streamed

RESNET = Path(__file__).resolve().parents[1] / "sample_models" / "resnet_small.onnx"


def _with_odd_fields() -> onnx.ModelProto:
    model = onnx.load(str(RESNET))
    first = model.graph.initializer[0]
    first.doc_string = "fields numbered after raw_data"
    first.metadata_props.add(key="k", value="v")
    return model


def test_streamed_bytes_are_the_serialized_model():
    model = _with_odd_fields()
    model.metadata_props.add(key="after", value="the graph")  # model fields on both sides of the graph
    model.graph.doc_string = "graph fields after the initializers"
    buffer = io.BytesIO()
    write_streamed(model, buffer)
    assert buffer.getvalue() == model.SerializeToString()


@pytest.mark.parametrize("which", [0, 1, -1])
def test_replacements_give_the_same_bytes_as_materialized(which):
    model = _with_odd_fields()
    tensor = model.graph.initializer[which]
    new = np.random.default_rng(0).standard_normal(tuple(tensor.dims)).astype(np.float32)
    expected_model = onnx.ModelProto()
    expected_model.CopyFrom(model)
    expected_model.graph.initializer[which].raw_data = new.tobytes()
    expected = io.BytesIO()
    write_streamed(expected_model, expected)
    actual = io.BytesIO()
    write_streamed(model, actual, {tensor.name: new})
    assert actual.getvalue() == expected.getvalue() == expected_model.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _unknown_fields(number: int) -> bytes:
    """Fields numbered ``number``.. of every wire type, as a newer ONNX could write them."""
    tag = lambda n, wire: _varint(n << 3 | wire)  # noqa: E731
    return (tag(number, 0) + _varint(300) + tag(number + 1, 1) + (2**63 + 5).to_bytes(8, "little")
            + tag(number + 2, 2) + _varint(3) + b"new" + tag(number + 3, 5) + (2**31 + 7).to_bytes(4, "little")
            + tag(number + 4, 3) + tag(1, 0) + _varint(9) + tag(number + 4, 4))


def _with_unknown_fields() -> onnx.ModelProto:
    """resnet_small with fields this onnx does not know on the model, the graph and two initializers."""
    model = _with_odd_fields()
    for tensor in (model.graph.initializer[0], model.graph.initializer[1]):
        tensor.CopyFrom(onnx.TensorProto.FromString(tensor.SerializeToString() + _unknown_fields(1000)))
    model.graph.CopyFrom(onnx.GraphProto.FromString(model.graph.SerializeToString() + _unknown_fields(2000)))
    return onnx.ModelProto.FromString(model.SerializeToString() + _unknown_fields(3000))


@pytest.mark.parametrize("which", [None, 0, 1, 2])
def test_fields_unknown_to_onnx_are_written_as_read(which):
    """A model from a newer ONNX keeps the fields this onnx does not know, in the bytes upb would write."""
    from google.protobuf import unknown_fields

    model = _with_unknown_fields()
    expected_model = onnx.ModelProto()
    expected_model.CopyFrom(model)
    replacements = {}
    if which is not None:
        tensor = model.graph.initializer[which]
        new = np.random.default_rng(1).standard_normal(tuple(tensor.dims)).astype(np.float32)
        replacements[tensor.name] = new
        expected_model.graph.initializer[which].raw_data = new.tobytes()
    buffer = io.BytesIO()
    write_streamed(model, buffer, replacements)
    assert buffer.getvalue() == expected_model.SerializeToString()
    back = onnx.ModelProto.FromString(buffer.getvalue())
    for message, number in ((back, 3000), (back.graph, 2000), (back.graph.initializer[0], 1000),
                            (back.graph.initializer[1], 1000)):
        assert [(f.field_number, f.wire_type) for f in unknown_fields.UnknownFieldSet(message)] == \
            [(number + i, wire) for i, wire in enumerate((0, 1, 2, 5, 3))]


def test_large_models_are_streamed_to_the_same_bytes(tmp_path, monkeypatch):
    """Above the streaming threshold the file is written piece by piece: the bytes are those of a small save."""
    import bnfold.onnx.io as bio

    model = _with_odd_fields()
    save_model(model, tmp_path / "whole.onnx")
    monkeypatch.setattr(bio, "_STREAM_FROM", 0)
    save_model(model, tmp_path / "streamed.onnx")
    assert (tmp_path / "whole.onnx").read_bytes() == (tmp_path / "streamed.onnx").read_bytes() == \
        model.SerializeToString()


def test_save_is_atomic_and_deterministic(tmp_path):
    model = onnx.load(str(RESNET))
    save_model(model, tmp_path / "a.onnx")
    save_model(model, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temporary left behind
    assert onnx.load(str(tmp_path / "a.onnx")) == model
    with pytest.raises(InputError, match="does not exist"):
        save_model(model, tmp_path / "missing" / "c.onnx")


def test_write_atomically_leaves_nothing_behind_and_gives_open_s_permissions(tmp_path):
    """The written file has the mode a plain open() gives; a writer that fails, with any exception, leaves the
    existing file untouched and no temporary file; an OSError becomes an InputError naming the path."""
    import os

    from bnfold.files import write_atomically

    target = tmp_path / "out.bin"
    write_atomically(target, lambda f: f.write(b"first"))
    with open(tmp_path / "plain.bin", "wb") as f:
        f.write(b"x")
    assert target.read_bytes() == b"first"
    assert os.stat(target).st_mode == os.stat(tmp_path / "plain.bin").st_mode
    (tmp_path / "plain.bin").unlink()

    def fails(error):
        def write(f):
            f.write(b"partial")
            raise error
        return write

    with pytest.raises(ZeroDivisionError):
        write_atomically(target, fails(ZeroDivisionError()))
    with pytest.raises(InputError, match=r"out\.bin: cannot write \(disk full\)"):
        write_atomically(target, fails(OSError(28, "disk full")))
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(InputError, match="cannot write"):
        write_atomically(tmp_path / "missing" / "x.bin", lambda f: f.write(b"x"))
    (tmp_path / "dir.bin").mkdir()
    with pytest.raises(InputError, match="cannot write"):  # a directory is not replaced by a file
        write_atomically(tmp_path / "dir.bin", lambda f: f.write(b"x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.bin", "out.bin"]
    assert not any((tmp_path / "dir.bin").iterdir())


def test_write_atomically_skips_a_temporary_name_that_is_taken(tmp_path, monkeypatch):
    """A name that exists (or a link planted under it) is never opened: the next random name is used."""
    import os

    from bnfold import files

    taken = tmp_path / ".out.bin.000000000000.tmp"
    taken.symlink_to(tmp_path / "elsewhere")
    names = iter([bytes(6), bytes([1] * 6)])
    monkeypatch.setattr(files.os, "urandom", lambda n: next(names))
    files.write_atomically(tmp_path / "out.bin", lambda f: f.write(b"data"))
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert not (tmp_path / "elsewhere").exists() and os.path.islink(taken)


def test_fold_file_matches_fold_onnx_byte_for_byte(tmp_path):
    report = fold_file(RESNET, tmp_path / "streamed.onnx")
    folded, report2 = fold_onnx(str(RESNET))
    save_model(folded, tmp_path / "materialized.onnx")
    assert report.to_dict() == report2.to_dict() and report.bn_after == 0
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "materialized.onnx").read_bytes()


def test_load_reads_memory_mapped_file_without_changing_it(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(RESNET.read_bytes())
    before = path.stat().st_mtime_ns, path.read_bytes()
    model, external = load_model_with_info(path)
    assert model == onnx.load(str(RESNET)) and external is False
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_model(tmp_path / "empty.onnx")


def test_library_prints_nothing(capfd, tmp_path):
    folded, report = bnfold.fold_onnx(str(RESNET))
    result = bnfold.verify(str(RESNET), folded, providers=["cpu"])
    fold_file(RESNET, tmp_path / "o.onnx")
    assert result and report.bn_after == 0
    out, err = capfd.readouterr()
    assert out == "" and err == ""


_PACKED_TYPES = [(name, per_byte) for name, per_byte in
                 (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4))
                 if hasattr(onnx.TensorProto, name)]


@pytest.mark.parametrize("type_name,per_byte", _PACKED_TYPES)
def test_packed_sub_byte_tensors_are_sized_by_packing(tmp_path, type_name, per_byte):
    """raw_data of 4- and 2-bit types holds several elements a byte: a right-sized one loads, a wrong one does not."""
    def model_with(nbytes: int) -> Path:
        tensor = onnx.TensorProto(name="packed", data_type=getattr(onnx.TensorProto, type_name), dims=[7],
                                  raw_data=bytes(nbytes))
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], [tensor])
        path = tmp_path / f"{type_name}_{nbytes}.onnx"
        path.write_bytes(onnx.helper.make_model(graph).SerializeToString())
        return path

    right = -(-7 // per_byte)  # ceil(7 / per_byte)
    assert load_model(model_with(right)).graph.initializer[0].raw_data == bytes(right)
    with pytest.raises(InputError, match=f"tensor 'packed' has 7 bytes, but its shape \\[7\\] needs {right}"):
        load_model(model_with(7))


# ---- every field, from the protobuf descriptors: a field the streamed writer did not expect would show here ------

def _set_some_value(message, field) -> None:
    """Give ``field`` of ``message`` a non-default value of its type (one element when repeated)."""
    fd = field
    if fd.type == fd.TYPE_MESSAGE:
        sub = getattr(message, fd.name).add() if fd.is_repeated else getattr(message, fd.name)
        for inner in sub.DESCRIPTOR.fields:  # one scalar field set is enough to make the message non-empty
            if inner.type in (inner.TYPE_STRING, inner.TYPE_BYTES) and not inner.is_repeated:
                setattr(sub, inner.name, "s" if inner.type == inner.TYPE_STRING else b"b")
                return
            if inner.type in (inner.TYPE_INT64, inner.TYPE_INT32) and not inner.is_repeated:
                setattr(sub, inner.name, 3)
                return
        return
    value = {fd.TYPE_STRING: "text", fd.TYPE_BYTES: b"\x01\x02", fd.TYPE_FLOAT: 1.5, fd.TYPE_DOUBLE: 2.5,
             fd.TYPE_BOOL: True, fd.TYPE_ENUM: 1}.get(fd.type, 7)
    if fd.is_repeated:
        getattr(message, fd.name).append(value)
    else:
        setattr(message, fd.name, value)


def _tensor_fields():
    return [f for f in onnx.TensorProto.DESCRIPTOR.fields if f.name not in ("raw_data", "name", "dims", "data_type")]


@pytest.mark.parametrize("field", _tensor_fields(), ids=lambda f: f.name)
@pytest.mark.parametrize("replaced", [True, False])
def test_every_tensor_field_streams_as_serialized(field, replaced):
    """Each TensorProto field on a written initializer, replaced or not: the same bytes as SerializeToString."""
    model = onnx.load(str(RESNET))
    tensor = model.graph.initializer[1]
    _set_some_value(tensor, field)
    if field.name == "data_location":  # 1 is EXTERNAL: keep the tensor in the file, as a loaded model would
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.ClearField("data_location")
        tensor.data_location = onnx.TensorProto.DEFAULT  # explicitly set: serialized as a present field
    replacements = {}
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    if replaced:
        new = np.random.default_rng(2).standard_normal(tuple(tensor.dims)).astype(np.float32)
        replacements[tensor.name] = new
        expected.graph.initializer[1].raw_data = new.tobytes()
    buffer = io.BytesIO()
    write_streamed(model, buffer, replacements)
    assert buffer.getvalue() == expected.SerializeToString()


@pytest.mark.parametrize("kind, field", [("model", f) for f in onnx.ModelProto.DESCRIPTOR.fields
                                         if f.name != "graph"] +
                         [("graph", f) for f in onnx.GraphProto.DESCRIPTOR.fields if f.name != "initializer"],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_model_and_graph_field_streams_as_serialized(kind, field):
    model = onnx.load(str(RESNET))
    _set_some_value(model if kind == "model" else model.graph, field)
    tensor = model.graph.initializer[0]
    new = np.random.default_rng(3).standard_normal(tuple(tensor.dims)).astype(np.float32)
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    expected.graph.initializer[0].raw_data = new.tobytes()
    buffer = io.BytesIO()
    write_streamed(model, buffer, {tensor.name: new})
    assert buffer.getvalue() == expected.SerializeToString()
