"""ONNX import: the zoo networks from torch and from their ONNX export, every supported node
on hand-built graphs, every refusal, and untrusted files (limits, external data, fuzzing)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX import needs onnx: pip install secureinfer[onnx]")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

import secureinfer  # noqa: E402
from secureinfer import cli  # noqa: E402
from secureinfer.compiler import lower as lower_torch  # noqa: E402
from secureinfer.errors import (CompileError, ConfigError, SecureInferError,  # noqa: E402
                                UnsupportedLayerError)
from secureinfer.layers import forward  # noqa: E402
from secureinfer.nn import arch  # noqa: E402
from secureinfer.onnx_import import Limits, load, read  # noqa: E402

# Every zoo architecture with the input it is tested on; add lenet5 here when it exists.
ZOO = [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("lenet5", (1, 12, 12))]


def _export(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    """``torch.onnx.export`` with the TorchScript exporter (the dynamo one needs onnxscript)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *shape),), buf, dynamo=False)
    return buf.getvalue()


def _same_specs(a, b) -> None:
    assert [type(l) for l in a] == [type(l) for l in b]
    for x, y in zip(a, b):
        assert x.in_shape == y.in_shape and x.out_shape == y.out_shape
        for attr in ("weight", "bias"):
            if hasattr(x, attr):
                assert np.array_equal(getattr(x, attr), getattr(y, attr)), (x.name, attr)
        for attr in ("coeffs", "stride", "padding", "kernel"):
            if hasattr(x, attr):
                assert getattr(x, attr) == getattr(y, attr), (x.name, attr)


# lenet5 (four activations: N=16384 under ckks) with one activation only, to keep it quick
@pytest.mark.parametrize("name, shape, activation",
                         [(n, s, a) for n, s in ZOO for a in ("square", "poly")
                          if n != "lenet5" or a == "poly"])
def test_zoo_network_from_torch_and_from_onnx_agree(name, shape, activation, digits, tmp_path):
    torch.manual_seed(1)
    model = arch.build(name, shape, 10, activation).eval()
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(_export(model, shape))
    from_torch, from_onnx = lower_torch(model, shape), load(path)
    _same_specs(from_torch, from_onnx)
    if shape == digits.x_test.shape[1:]:
        x, cal = digits.x_test[:3], digits.x_train[:256]
    else:  # an image size the zoo network needs (lenet5: two k5 convolutions, two pools)
        rng = np.random.default_rng(0)
        x, cal = rng.random((3, *shape)), rng.random((256, *shape))
    # lenet5's four activations with the default output flood would take N=32768 (~7 GB);
    # this test is about the lowering, so it runs ckks unflooded there
    for scheme in ("clear", "ckks" if name != "lenet5" else "ckks?flood_bits=0"):
        cls = secureinfer.get_registry().get(scheme.split("?")[0])
        if cls.availability():
            pytest.skip(f"{scheme}: {cls.availability()}")
        logits = []
        for source in (model, str(path)):
            sm = secureinfer.compile(source, scheme, input_shape=shape, calibration=cal)
            client, server, _ = sm.setup()
            logits.append(client.decrypt(server.evaluate(client.encrypt(x))))
        tol = 0.0 if scheme == "clear" else sm.scheme.capabilities.tolerance
        np.testing.assert_allclose(logits[0], logits[1], atol=tol, rtol=0)
        np.testing.assert_allclose(logits[1], sm.predict_clear(x), atol=max(tol, 1e-12))


# ----- hand-built graphs ------------------------------------------------------------------

def _t(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _graph(nodes, inits, shape, out_shape=None, *, batch="N", out="y", inputs=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *shape])
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs or [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bytes(model) -> bytes:
    return model.SerializeToString()


R = np.random.default_rng(0)
W4 = R.normal(size=(3, 2, 3, 3)).astype(np.float32)
B3 = R.normal(size=3).astype(np.float32)
FC = R.normal(size=(5, 12)).astype(np.float32)
FB = R.normal(size=5).astype(np.float32)
BN = [R.uniform(0.5, 2, 3), R.normal(size=3), R.normal(size=3), R.uniform(0.5, 2, 3)]


def _bn_ref(y, axis_shape):
    g, b, m, v = (torch.tensor(a).reshape(axis_shape) for a in BN)
    return (y - m) / torch.sqrt(v + 1e-5) * g + b


def _conv(x, **kw):
    return torch.nn.functional.conv2d(x, torch.tensor(W4).double(), torch.tensor(B3).double(),
                                      **kw)


# name -> (nodes, initializers, input shape, torch reference on x (n, *shape), kinds)
CASES = {
    "conv_bias_stride_pad": (
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c", strides=[2, 2],
                          pads=[1, 1, 1, 1], kernel_shape=[3, 3])],
        [_t("w", W4), _t("b", B3)], (2, 6, 6),
        lambda x: _conv(x, stride=2, padding=1), ["conv2d"]),
    "conv_no_bias": (
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
        [_t("w", W4)], (2, 5, 5),
        lambda x: _conv(x) - torch.tensor(B3).double().reshape(1, 3, 1, 1), ["conv2d"]),
    "conv_batchnorm_folded": (
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="c"),
         helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["y"], name="bn")],
        [_t("w", W4), _t("b", B3), _t("g", BN[0]), _t("be", BN[1]), _t("m", BN[2]),
         _t("v", BN[3])], (2, 5, 5),
        lambda x: _bn_ref(_conv(x), (1, 3, 1, 1)), ["conv2d"]),
    "gemm_transb_alpha_beta": (
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha=0.5,
                          beta=2.0)],
        [_t("w", FC), _t("b", FB)], (12,),
        lambda x: 0.5 * x @ torch.tensor(FC).double().T + 2 * torch.tensor(FB).double(),
        ["linear"]),
    "gemm_no_c_then_batchnorm": (
        [helper.make_node("Gemm", ["x", "w"], ["g1"], name="fc"),
         helper.make_node("BatchNormalization", ["g1", "g", "be", "m", "v"], ["y"])],
        [_t("w", FC[:3].T.copy()), _t("g", BN[0]), _t("be", BN[1]), _t("m", BN[2]),
         _t("v", BN[3])], (12,),
        lambda x: _bn_ref(x @ torch.tensor(FC[:3]).double().T, (1, 3)), ["linear"]),
    "matmul_add": (
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "b"], ["y"], name="bias")],
        [_t("w", FC.T.copy()), _t("b", FB)], (12,),
        lambda x: x @ torch.tensor(FC).double().T + torch.tensor(FB).double(), ["linear"]),
    "average_pool_flatten": (
        [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Flatten", ["p"], ["y"], axis=1)],
        [], (2, 6, 6), lambda x: torch.nn.functional.avg_pool2d(x, 2).flatten(1),
        ["avgpool2d", "flatten"]),
    "global_average_pool_reshape": (
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
         helper.make_node("Reshape", ["p", "s"], ["y"])],
        [numpy_helper.from_array(np.array([-1, 2], dtype=np.int64), "s")], (2, 4, 4),
        lambda x: x.mean(dim=(2, 3)), ["avgpool2d", "flatten"]),
    "mul_x_x_and_pow": (
        [helper.make_node("Mul", ["x", "x"], ["s"]),
         helper.make_node("Gemm", ["s", "w"], ["g1"], transB=1),
         helper.make_node("Pow", ["g1", "two"], ["y"])],
        [_t("w", FC), _t("two", 2.0)], (12,),
        lambda x: ((x * x) @ torch.tensor(FC).double().T) ** 2, ["poly", "linear", "poly"]),
    "polynomial_chain": (  # 0.5 - 2x + 3x^2 - x^3 / 4, written as Mul/Add/Sub/Neg/Div
        [helper.make_node("Mul", ["x", "x"], ["x2"]),
         helper.make_node("Mul", ["x2", "x"], ["x3"]),
         helper.make_node("Div", ["x3", "four"], ["a"]),
         helper.make_node("Neg", ["a"], ["b"]),
         helper.make_node("Mul", ["three", "x2"], ["c"]),
         helper.make_node("Add", ["b", "c"], ["d"]),
         helper.make_node("Mul", ["x", "two"], ["e"]),
         helper.make_node("Sub", ["d", "e"], ["f"]),
         helper.make_node("Add", ["f", "half"], ["y"], name="act")],
        [_t("four", 4.0), _t("three", [3.0]), _t("two", 2.0), _t("half", 0.5)], (7,),
        lambda x: 0.5 - 2 * x + 3 * x ** 2 - x ** 3 / 4, ["poly"]),
    "identity_dropout_constant": (
        [helper.make_node("Constant", [], ["w"], value=_t("wv", FC)),
         helper.make_node("Identity", ["x"], ["i"]),
         helper.make_node("Dropout", ["i"], ["d"]),
         helper.make_node("Gemm", ["d", "w", "b"], ["y"], transB=1),
         ],
        [_t("b", FB)], (12,),
        lambda x: x @ torch.tensor(FC).double().T + torch.tensor(FB).double(), ["linear"]),
    "constant_float_coefficient": (
        [helper.make_node("Constant", [], ["k"], value_float=1.5),
         helper.make_node("Mul", ["x", "x"], ["s"]),
         helper.make_node("Mul", ["s", "k"], ["y"])],
        [], (4,), lambda x: 1.5 * x * x, ["poly"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_supported_node_matches_torch(case, rng):
    nodes, inits, shape, ref, kinds = CASES[case]
    layers = load(_bytes(_graph(nodes, inits, shape)), shape)
    assert [l.kind for l in layers] == kinds
    x = rng.normal(size=(4, *shape))
    np.testing.assert_allclose(forward(layers, x), ref(torch.tensor(x)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_polynomial_chain_is_one_poly_layer():
    nodes, inits, shape, _, _ = CASES["polynomial_chain"]
    (poly,) = load(_bytes(_graph(nodes, inits, shape)), shape)
    assert poly.name == "act/Add" and poly.coeffs == pytest.approx((0.5, -2.0, 3.0, -0.25))


# ----- refusals -----------------------------------------------------------------------------

def _gemm_then(node, extra_inits=()):
    return _bytes(_graph([helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
                          node], [_t("w", FC), *extra_inits], (12,)))


@pytest.mark.parametrize("op, cls", [("Relu", "ReLU"), ("Sigmoid", "Sigmoid"),
                                     ("Tanh", "Tanh"), ("Softmax", "Softmax")])
def test_non_polynomial_nodes_are_refused_under_he(op, cls, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_gemm_then(helper.make_node(op, ["h"], ["y"], name="act")))
    with pytest.raises(UnsupportedLayerError) as info:
        secureinfer.compile(str(path), "clear")
    msg = str(info.value)
    assert f"act/{op}" in msg and cls in msg and "make_he_friendly" in msg \
        and "--activation poly" in msg


def test_max_pool_is_refused_under_he_and_allowed_in_a_clear_suffix(tmp_path, digits):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w2"], ["y"], transB=1)]
    w = R.normal(size=(3, 1, 3, 3)).astype(np.float32)
    path = tmp_path / "m.onnx"
    path.write_bytes(_bytes(_graph(nodes, [_t("w", w), _t("b", B3),
                                           _t("w2", R.normal(size=(10, 27)))], (1, 8, 8))))
    with pytest.raises(UnsupportedLayerError, match="pool/MaxPool.*make_he_friendly"):
        secureinfer.compile(str(path), "clear")
    pytest.importorskip("pymcl", reason="fe-ip needs pymcl: pip install secureinfer[fe]")
    sm = secureinfer.compile(str(path), "fe-ip", calibration=digits.x_train[:128])
    assert [l.kind for l in sm.clear_layers] == ["maxpool2d", "flatten", "linear"]
    client, server, _ = sm.setup()
    x = digits.x_test[:2]
    got = client.decrypt(server.evaluate(client.encrypt(x)))
    np.testing.assert_allclose(got, sm.reference(x), atol=1e-9)


REFUSALS = {
    "gelu": (helper.make_node("Gelu", ["h"], ["y"], name="g", domain=""),
             [], "g/Gelu \\(op Gelu\\): Gelu is not a polynomial.*make_he_friendly"),
    "shape": (helper.make_node("Shape", ["h"], ["y"], name="sh"), [],
              "sh/Shape \\(op Shape\\).*without dynamic_axes.*nn.Flatten"),
    "concat": (helper.make_node("Concat", ["h", "h"], ["y"], name="cat", axis=1),
               [], "cat/Concat \\(op Concat\\): Concat has no HE-friendly equivalent"),
    "pow_half": (helper.make_node("Pow", ["h", "e"], ["y"], name="p"), [_t("e", 0.5)],
                 "op Pow.*exponent 0.5"),
    "div_by_tensor": (helper.make_node("Div", ["h", "h"], ["y"], name="d"), [],
                      "op Div.*division by a tensor"),
    "per_element_coefficient": (
        helper.make_node("Mul", ["h2", "k"], ["y"], name="m"), [_t("k", R.normal(size=5))],
        "op Mul.*per-element constant"),
    "custom_domain": (helper.make_node("Foo", ["h"], ["y"], name="f", domain="com.x"), [],
                      "custom-domain op com.x.Foo"),
    "reshape_not_flat": (helper.make_node("Reshape", ["h", "s"], ["y"], name="r"),
                         [numpy_helper.from_array(np.array([1, 5, 1], np.int64), "s")],
                         "Reshape to \\[1, 5, 1\\]"),
    "batchnorm_after_activation": (
        helper.make_node("BatchNormalization", ["h2", "g", "g", "g", "g"], ["y"], name="bn"),
        [_t("g", np.ones(5))], "must directly follow a Conv, Gemm or MatMul"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_node_op_and_fix(case):
    node, inits, pattern = REFUSALS[case]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
             helper.make_node("Mul", ["h", "h"], ["h2"], name="sq"), node]
    with pytest.raises(UnsupportedLayerError, match=pattern):
        load(_bytes(_graph(nodes, [_t("w", FC[:5]), *inits], (12,))))


def test_a_branching_graph_is_refused():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
             helper.make_node("Mul", ["h", "h"], ["h2"]),
             helper.make_node("Gemm", ["h2", "w2"], ["h3"], name="fc2", transB=1),
             helper.make_node("Add", ["h3", "h"], ["y"], name="residual")]
    with pytest.raises(UnsupportedLayerError, match="residual/Add.*branches"):
        load(_bytes(_graph(nodes, [_t("w", FC[:5]), _t("w2", R.normal(size=(5, 5)))], (12,))))


@pytest.mark.parametrize("attrs, pattern", [
    ({"group": 2}, "group > 1"), ({"dilations": [2, 2]}, "dilation"),
    ({"pads": [1, 0, 0, 0]}, "symmetric"), ({"auto_pad": "SAME_UPPER"}, "auto_pad"),
    ({"auto_pad": "VALID", "pads": [1, 1, 1, 1]}, "auto_pad=VALID together with pads")])
def test_conv_refusals(attrs, pattern):
    w = R.normal(size=(4, 2 if "group" not in attrs else 1, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", **attrs)
    with pytest.raises(UnsupportedLayerError, match=f"c/Conv \\(op Conv\\).*{pattern}"):
        load(_bytes(_graph([node], [_t("w", w)], (2, 6, 6))))


def test_conv_bias_needs_one_entry_per_output_channel():
    w = R.normal(size=(4, 2, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c")
    with pytest.raises(CompileError, match=r"c/Conv \(op Conv\): bias B of shape \(1,\) .*M=4"):
        load(_bytes(_graph([node], [_t("w", w), _t("b", np.ones(1, np.float32))], (2, 6, 6))))


def test_batchnorm_statistics_need_one_entry_per_channel():
    w = R.normal(size=(4, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="c"),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["y"],
                              name="bn")]
    one, four = np.ones(1, np.float32), np.ones(4, np.float32)
    graph = _graph(nodes, [_t("w", w), _t("g", one), _t("be", four), _t("m", four),
                           _t("v", four)], (2, 6, 6))
    with pytest.raises(CompileError, match=r"bn/BatchNormalization \(op BatchNormalization\): "
                                           r"statistics scale of shape \(1,\).*channel \(4\)"):
        load(_bytes(graph))


def test_input_shape_from_the_graph_or_the_argument():
    nodes = [helper.make_node("Mul", ["x", "x"], ["y"])]
    dynamic = _bytes(_graph(nodes, [], ("C",)))
    with pytest.raises(ConfigError, match="dynamic shape.*input_shape="):
        load(dynamic)
    assert load(dynamic, (6,))[0].in_shape == (6,)
    static = _bytes(_graph(nodes, [], (6,), batch=1))
    assert load(static)[0].in_shape == (6,)
    with pytest.raises(ConfigError, match="input_shape=\\(7,\\).*\\(6,\\)"):
        load(static, (7,))


def test_mismatched_weights_are_a_compile_error():
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    with pytest.raises(CompileError, match="fc/Gemm"):
        load(_bytes(_graph([node], [_t("w", FC)], (11,))))


# ----- untrusted files ----------------------------------------------------------------------

def _small() -> bytes:
    torch.manual_seed(0)
    return _export(arch.build("mlp", (1, 4, 4), 3, "poly", hidden=(4,)).eval(), (1, 4, 4))


def test_size_limit_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.onnx"
    path.write_bytes(_small())
    with pytest.raises(ConfigError, match="bytes, above the ONNX file limit of 100"):
        read(path, Limits(max_bytes=100))


@pytest.mark.parametrize("limits, pattern", [
    (Limits(max_nodes=2), "nodes, above the limit of 2"),
    (Limits(max_initializers=2), "initializers and constants, above the limit of 2"),
    (Limits(max_tensor_elements=10), "more than 10 elements"),
    (Limits(max_total_elements=20), "weight elements, above the limit of 20"),
])
def test_graph_limits(limits, pattern):
    with pytest.raises(ConfigError, match=pattern):
        read(_small(), limits)


def test_truncated_and_random_bytes(tmp_path):
    data = _small()
    for bad in (data[: len(data) // 2], b"\x00\xff" * 50, b""):
        with pytest.raises(ConfigError, match="ONNX"):
            load(bad)
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ConfigError, match="does not exist"):
        load(missing)


def test_external_data_is_refused():
    model = onnx.load_from_string(_small())
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    with pytest.raises(ConfigError, match="external data \\('/etc/passwd'\\).*embedded"):
        load(model.SerializeToString())


def test_fuzzed_files_raise_only_secureinfer_errors():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    data = _small()

    @hypothesis.settings(max_examples=600, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                               min_size=1, max_size=8),
                      st.integers(1, len(data)))
    def check(edits, cut):
        mutated = bytearray(data[:cut])
        for pos, value in edits:
            if pos < len(mutated):
                mutated[pos] = value
        try:
            layers = load(bytes(mutated), (1, 4, 4))
        except SecureInferError:
            return
        forward(layers, np.zeros((1, 1, 4, 4)))  # what loads also runs

    check()


# ----- the command line ---------------------------------------------------------------------

def test_convert_writes_a_model_file_that_compiles_alike(tmp_path, capsys, digits):
    torch.manual_seed(2)
    model = arch.build("mlp", (1, 8, 8), 10, "poly").eval()
    src = tmp_path / "m.onnx"
    src.write_bytes(_export(model, (1, 8, 8)))
    out = tmp_path / "m.npz"
    assert cli.main(["convert", str(src), "--out", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["source"] == "onnx" and meta["out"] == str(out)
    loaded = secureinfer.nn.load(out)
    assert loaded.secureinfer_calibration is not None
    _same_specs(lower_torch(loaded, (1, 8, 8)), load(src))
    x = digits.x_test[:8]
    a = secureinfer.compile(loaded, "clear").predict_clear(x)
    b = secureinfer.compile(str(src), "clear").predict_clear(x)
    np.testing.assert_array_equal(a, b)


def test_convert_keeps_a_relu_suffix_and_refuses_bad_files(tmp_path, capsys):
    torch.manual_seed(2)
    src = tmp_path / "relu.onnx"
    src.write_bytes(_export(arch.build("cnn", (1, 8, 8), 10, "relu").eval(), (1, 8, 8)))
    out = tmp_path / "relu.npz"
    assert cli.main(["convert", str(src), "--out", str(out)]) == 0
    assert "ReLU" in capsys.readouterr().out
    assert isinstance(secureinfer.nn.load(out)[1], nn.ReLU)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file at all")
    assert cli.main(["convert", str(bad), "--out", str(tmp_path / "x.npz")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_run_takes_an_onnx_model(tmp_path, capsys):
    torch.manual_seed(3)
    src = tmp_path / "m.onnx"
    model = arch.build("mlp", (1, 8, 8), 10, "square").eval()
    src.write_bytes(_export(model, (1, 8, 8)))
    assert cli.main(["run", "--scheme", "clear", "--model", str(src), "--limit", "5",
                     "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(src) and report["agreement"] == 1.0
    assert report["secure_layers"][1] == "Linear /fc1/Gemm 64->32"


def test_to_module_lowers_back_to_the_same_layers(rng):
    from secureinfer.layers import (AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, Poly, ReLU,
                                    Sigmoid, Softmax, Tanh)
    from secureinfer.nn.from_onnx import to_module

    f32 = lambda a: np.asarray(a, dtype=np.float32).astype(np.float64)  # noqa: E731
    layers = [Conv2d("c", (1, 9, 9), weight=f32(rng.normal(size=(2, 1, 3, 3))),
                     bias=f32(rng.normal(size=2)), stride=(1, 1), padding=(1, 1)),
              Poly("p", (2, 9, 9), coeffs=(0.25, -1.0, 0.5, 0.125)),
              AvgPool2d("a", (2, 9, 9), kernel=3, stride=3),
              Poly("s", (2, 3, 3), coeffs=(0.0, 0.0, 1.0)),
              MaxPool2d("m", (2, 3, 3), kernel=2, stride=1, padding=1), ReLU("r", (2, 4, 4)),
              Flatten("f", (2, 4, 4)),
              Linear("l", (32,), weight=f32(rng.normal(size=(6, 32))), bias=f32(np.zeros(6))),
              Sigmoid("g", (6,)), Tanh("t", (6,)), Softmax("x", (6,))]
    _same_specs(lower_torch(to_module(layers), (1, 9, 9)), layers)
