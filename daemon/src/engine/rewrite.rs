//! The `tract+float` plan's load-time rewrite of a quantised ONNX graph: int8 on the wire and
//! on disk, float in the kernel.
//!
//! ```text
//!  QLinearConv(x, w_i8, b_i32)  ─►  DequantizeLinear(x) ─► Conv(w_f32, b_f32) ─► QuantizeLinear
//!  QLinearMatMul(a, b_i8)       ─►  DequantizeLinear(a) ─► MatMul(b_f32)      ─► QuantizeLinear
//!  DequantizeLinear(constant)   ─►  a float initializer
//!  QuantizeLinear ─► DequantizeLinear (same scale and zero point)  ─►  Max ─► Min (the clamp)
//! ```
//!
//! On x86, tract has no int8 matrix-vector kernel and quantises and dequantises activations
//! element by element, so a quantised model runs several times slower than its float form
//! (a QDQ model, 17× on PP-OCR's classifier). Rewritten, it runs as the float model would with
//! the package's dequantised weights. A removed pair leaves its clamp to the int8 range in
//! float, since quantisers fold a Relu or a Clip into that saturation. The outputs are not the
//! int8 model's to the bit: the activations are no longer rounded to the int8 grid. The
//! package's golden vectors decide, as for every plan, whether that is close enough to serve.
//!
//! Pure protobuf work: nothing here runs a model.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto, tensor_proto::DataType};

/// What the rewrite changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Quantised operators turned into their float form.
    pub ops: usize,
    /// Constant tensors dequantised once, here.
    pub folded: usize,
    /// Quantise–dequantise pairs removed.
    pub pairs: usize,
}

impl Rewritten {
    pub fn any(&self) -> bool {
        self.ops + self.folded + self.pairs > 0
    }
}

impl std::fmt::Display for Rewritten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} quantised op(s) made float, {} constant(s) dequantised, {} quantise-dequantise \
             pair(s) removed",
            self.ops, self.folded, self.pairs
        )
    }
}

/// Whether the graph has anything the rewrite would change.
pub fn is_quantised(g: &GraphProto) -> bool {
    g.node.iter().any(|n| {
        n.domain.is_empty()
            && matches!(
                n.op_type.as_str(),
                "QLinearConv" | "QLinearMatMul" | "DequantizeLinear"
            )
    })
}

/// A constant's values as f32, with its shape.
struct Values {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// The graph's constant tensors by name: initializers (tract takes one that is also listed as
/// a graph input, as old exporters list every initializer, as a constant too) and `Constant`
/// nodes' values. Loaded when first asked for.
struct Constants<'a> {
    protos: HashMap<&'a str, &'a TensorProto>,
    dir: Option<&'a str>,
}

impl<'a> Constants<'a> {
    fn new(g: &'a GraphProto, dir: Option<&'a str>) -> Constants<'a> {
        let mut protos: HashMap<&str, &TensorProto> =
            g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        for n in &g.node {
            if n.op_type == "Constant"
                && n.domain.is_empty()
                && let [out] = n.output.as_slice()
                && let Some(t) = n
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
            {
                protos.insert(out.as_str(), t);
            }
        }
        Constants { protos, dir }
    }

    fn data_type(&self, name: &str) -> Option<i32> {
        self.protos.get(name).map(|t| t.data_type)
    }

    /// A constant of one element, as f32.
    fn scalar(&self, name: &str) -> Option<f32> {
        let v = self.get(name)?;
        (v.data.len() == 1).then(|| v.data[0])
    }

    fn get(&self, name: &str) -> Option<Values> {
        let t = self.protos.get(name)?;
        let resolver = tract_onnx::data_resolver::MmapDataResolver;
        let t = tract_onnx::tensor::load_tensor(&resolver, t, self.dir).ok()?;
        let f = t.cast_to::<f32>().ok()?;
        Some(Values {
            shape: t.shape().to_vec(),
            data: f
                .to_plain_array_view::<f32>()
                .ok()?
                .iter()
                .copied()
                .collect(),
        })
    }
}

/// `(x - zero_point) * scale`, per tensor or per slice along `axis`.
fn dequantise(x: &Values, scale: &Values, zero: Option<&Values>, axis: usize) -> Option<Values> {
    let channels = scale.data.len();
    let zero = match zero {
        Some(z) if z.data.len() != channels => return None,
        Some(z) => z.data.clone(),
        None => vec![0.0; channels],
    };
    // Elements per index of `axis` run in blocks of `inner`.
    let inner: usize = match channels {
        1 => x.data.len().max(1),
        _ if axis < x.shape.len() && x.shape[axis] == channels => {
            x.shape[axis + 1..].iter().product()
        }
        _ => return None,
    };
    let data = x
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = if channels == 1 {
                0
            } else {
                (i / inner) % channels
            };
            (v - zero[c]) * scale.data[c]
        })
        .collect();
    Some(Values {
        shape: x.shape.clone(),
        data,
    })
}

fn float_tensor(name: String, v: Values) -> TensorProto {
    TensorProto {
        name,
        dims: v.shape.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: v.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..TensorProto::default()
    }
}

fn node(op: &str, name: String, input: Vec<String>, output: Vec<String>) -> NodeProto {
    NodeProto {
        op_type: op.to_string(),
        name,
        input,
        output,
        ..NodeProto::default()
    }
}

fn int_attr(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// Rewrite `g` in place (see the module's doc). `dir` is the model's directory, for weights
/// stored outside the file. An operator whose weights are not constants, or that uses a form
/// the rewrite does not know (blocked quantisation), is left as it is.
pub fn to_float(g: &mut GraphProto, dir: Option<&str>) -> Rewritten {
    let mut done = Rewritten::default();
    let mut new_consts: Vec<TensorProto> = Vec::new();
    // Names the bodies of If, Loop and Scan read from this graph's scope: kept as they are.
    let mut outer = HashSet::new();
    for n in &g.node {
        subgraph_reads(n, &mut outer);
    }
    let mut nodes: Vec<NodeProto> = Vec::with_capacity(g.node.len());
    {
        let consts = Constants::new(g, dir);
        let opt = |n: &NodeProto, i: usize| n.input.get(i).filter(|s| !s.is_empty()).cloned();
        for n in &g.node {
            if !n.domain.is_empty() {
                nodes.push(n.clone());
                continue;
            }
            let replaced = match n.op_type.as_str() {
                "DequantizeLinear" => fold_dequantise(n, &consts).map(|t| {
                    done.folded += 1;
                    new_consts.push(t);
                    Vec::new()
                }),
                "QLinearConv" => qlinear_conv(n, &consts, &opt).map(|(ns, ts)| {
                    done.ops += 1;
                    new_consts.extend(ts);
                    ns
                }),
                "QLinearMatMul" => qlinear_matmul(n, &consts).map(|(ns, ts)| {
                    done.ops += 1;
                    new_consts.extend(ts);
                    ns
                }),
                _ => None,
            };
            match replaced {
                Some(ns) => nodes.extend(ns),
                None => nodes.push(n.clone()),
            }
        }
        let (replaced, bounds) = strip_pairs(nodes, g, &outer, &consts);
        nodes = replaced.0;
        done.pairs = replaced.1;
        new_consts.extend(bounds);
    }
    g.node = nodes;
    g.initializer.extend(new_consts);
    // The int8 weights no node reads any more are dropped, not kept in memory beside their
    // float form.
    let used: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(g.output.iter().map(|o| o.name.clone()))
        .chain(outer)
        .collect();
    let dropped: HashSet<String> = g
        .initializer
        .iter()
        .filter(|t| !used.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    g.initializer.retain(|t| !dropped.contains(&t.name));
    // An initializer also listed as a graph input goes with its listing, or the name would
    // become an input the caller must feed.
    g.input.retain(|i| !dropped.contains(&i.name));
    g.node.retain(|n| {
        !(n.op_type == "Constant"
            && n.domain.is_empty()
            && n.output.iter().all(|o| !used.contains(o)))
    });
    done
}

/// A `DequantizeLinear` of constants, computed: the float initializer that replaces it.
fn fold_dequantise(n: &NodeProto, consts: &Constants<'_>) -> Option<TensorProto> {
    // Blocked quantisation, or an output type other than the scale's f32, is left to tract.
    if int_attr(n, "block_size").is_some_and(|b| b != 0)
        || n.attribute.iter().any(|a| a.name == "output_dtype")
        || consts.data_type(n.input.get(1)?)? != DataType::Float as i32
    {
        return None;
    }
    let x = consts.get(n.input.first()?)?;
    let scale = consts.get(n.input.get(1)?)?;
    let zero = match n.input.get(2).filter(|s| !s.is_empty()) {
        Some(z) => Some(consts.get(z)?),
        None => None,
    };
    let rank = x.shape.len() as i64;
    let axis = int_attr(n, "axis").unwrap_or(1);
    let axis = if axis < 0 { axis + rank } else { axis };
    let y = dequantise(&x, &scale, zero.as_ref(), usize::try_from(axis).ok()?)?;
    Some(float_tensor(n.output.first()?.clone(), y))
}

type Replacement = (Vec<NodeProto>, Vec<TensorProto>);

/// `QLinearConv` → dequantise x, `Conv` with float weights and bias, quantise y.
fn qlinear_conv(
    n: &NodeProto,
    consts: &Constants<'_>,
    opt: &dyn Fn(&NodeProto, usize) -> Option<String>,
) -> Option<Replacement> {
    let [x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero] = n.input.get(..8)? else {
        return None;
    };
    let out = n.output.first()?;
    // x and y are quantised per tensor (the operator's definition): constant scalars here.
    for name in [x_scale, x_zero, y_scale, y_zero] {
        consts.scalar(name)?;
    }
    let weights = consts.get(w)?;
    let wf = dequantise(
        &weights,
        &consts.get(w_scale)?,
        Some(&consts.get(w_zero)?),
        0,
    )?;
    let mut tensors = vec![float_tensor(format!("{out}.tern.w"), wf)];
    let mut conv_in = vec![format!("{out}.tern.x"), format!("{out}.tern.w")];
    if let Some(b) = opt(n, 8) {
        // The int32 bias is in units of x_scale × w_scale (per output channel).
        let bias = consts.get(&b)?;
        let xs = consts.get(x_scale)?;
        let ws = consts.get(w_scale)?;
        if xs.data.len() != 1 || !(ws.data.len() == 1 || ws.data.len() == bias.data.len()) {
            return None;
        }
        let data = bias
            .data
            .iter()
            .enumerate()
            .map(|(i, &v)| v * xs.data[0] * ws.data[if ws.data.len() == 1 { 0 } else { i }])
            .collect();
        tensors.push(float_tensor(
            format!("{out}.tern.b"),
            Values {
                shape: bias.shape,
                data,
            },
        ));
        conv_in.push(format!("{out}.tern.b"));
    }
    let mut conv = node(
        "Conv",
        format!("{out}.tern.conv"),
        conv_in,
        vec![format!("{out}.tern.y")],
    );
    conv.attribute = n.attribute.clone();
    Some((
        vec![
            node(
                "DequantizeLinear",
                format!("{out}.tern.dq"),
                vec![x.clone(), x_scale.clone(), x_zero.clone()],
                vec![format!("{out}.tern.x")],
            ),
            conv,
            node(
                "QuantizeLinear",
                format!("{out}.tern.q"),
                vec![format!("{out}.tern.y"), y_scale.clone(), y_zero.clone()],
                vec![out.clone()],
            ),
        ],
        tensors,
    ))
}

/// `QLinearMatMul` with constant 2-D `b` → dequantise a, `MatMul` with float b, quantise y.
fn qlinear_matmul(n: &NodeProto, consts: &Constants<'_>) -> Option<Replacement> {
    let [a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero] = n.input.get(..8)? else {
        return None;
    };
    let out = n.output.first()?;
    // a and y may be quantised per row, along an axis DequantizeLinear's default would miss:
    // only their per-tensor form is rewritten.
    for name in [a_scale, a_zero, y_scale, y_zero] {
        consts.scalar(name)?;
    }
    let weights = consts.get(b)?;
    if weights.shape.len() != 2 && consts.get(b_scale)?.data.len() != 1 {
        return None;
    }
    // A per-column scale runs along the last axis of b.
    let axis = weights.shape.len().saturating_sub(1);
    let bf = dequantise(
        &weights,
        &consts.get(b_scale)?,
        Some(&consts.get(b_zero)?),
        axis,
    )?;
    Some((
        vec![
            node(
                "DequantizeLinear",
                format!("{out}.tern.dq"),
                vec![a.clone(), a_scale.clone(), a_zero.clone()],
                vec![format!("{out}.tern.a")],
            ),
            node(
                "MatMul",
                format!("{out}.tern.matmul"),
                vec![format!("{out}.tern.a"), format!("{out}.tern.b")],
                vec![format!("{out}.tern.y")],
            ),
            node(
                "QuantizeLinear",
                format!("{out}.tern.q"),
                vec![format!("{out}.tern.y"), y_scale.clone(), y_zero.clone()],
                vec![out.clone()],
            ),
        ],
        vec![float_tensor(format!("{out}.tern.b"), bf)],
    ))
}

/// Every input read by the subgraphs in `n`'s attributes, at any depth: a body may read a name
/// of the enclosing scope, which the rewrite must neither drop nor rename.
fn subgraph_reads(n: &NodeProto, out: &mut HashSet<String>) {
    for a in &n.attribute {
        for g in a.g.iter().chain(&a.graphs) {
            for inner in &g.node {
                out.extend(inner.input.iter().filter(|i| !i.is_empty()).cloned());
                subgraph_reads(inner, out);
            }
        }
    }
}

/// Replace each `DequantizeLinear` that undoes a `QuantizeLinear` with the same constant,
/// per-tensor scale and zero point by the clamp the pair applies, `Max(x, (qmin − zp)·s)` then
/// `Min(·, (qmax − zp)·s)` on the quantiser's float input x (the rounding is what goes); then
/// remove the quantisers nothing reads any more. A pair whose output is a graph output, or is
/// read by a subgraph, stays. Returns the nodes, the number of pairs replaced, and the clamps'
/// bounds as initializers.
fn strip_pairs(
    nodes: Vec<NodeProto>,
    g: &GraphProto,
    outer: &HashSet<String>,
    consts: &Constants<'_>,
) -> ((Vec<NodeProto>, usize), Vec<TensorProto>) {
    let keep: HashSet<&str> = g
        .output
        .iter()
        .map(|o| o.name.as_str())
        .chain(outer.iter().map(String::as_str))
        .collect();
    let plain = |n: &NodeProto| {
        int_attr(n, "block_size").unwrap_or(0) == 0
            && !n.attribute.iter().any(|a| a.name == "output_dtype")
    };
    let quantisers: HashMap<&str, &NodeProto> = nodes
        .iter()
        .filter(|n| n.op_type == "QuantizeLinear" && n.domain.is_empty() && plain(n))
        .filter_map(|n| Some((n.output.first()?.as_str(), n)))
        .collect();
    // The clamp a pair applies, if it is one with constant per-tensor parameters.
    let clamp = |dq: &NodeProto| -> Option<(String, f32, f32)> {
        if dq.op_type != "DequantizeLinear" || !dq.domain.is_empty() || !plain(dq) {
            return None;
        }
        if keep.contains(dq.output.first()?.as_str()) {
            return None;
        }
        let q = quantisers.get(dq.input.first()?.as_str())?;
        let param = |n: &NodeProto, i: usize| n.input.get(i).filter(|s| !s.is_empty()).cloned();
        if param(q, 1) != param(dq, 1) || param(q, 2) != param(dq, 2) {
            return None;
        }
        let scale = consts.scalar(&param(q, 1)?)?;
        // The zero point's type is the quantised type (uint8 when there is none).
        let (zero, qmin, qmax) = match param(q, 2) {
            None => (0.0, 0.0, 255.0),
            Some(z) => {
                let v = consts.scalar(&z)?;
                match consts.data_type(&z)? {
                    t if t == DataType::Uint8 as i32 => (v, 0.0, 255.0),
                    t if t == DataType::Int8 as i32 => (v, -128.0, 127.0),
                    _ => return None,
                }
            }
        };
        Some((
            q.input.first()?.clone(),
            (qmin - zero) * scale,
            (qmax - zero) * scale,
        ))
    };
    let mut out = Vec::with_capacity(nodes.len());
    let mut bounds = Vec::new();
    let mut pairs = 0;
    for n in &nodes {
        let Some((x, lo, hi)) = clamp(n) else {
            out.push(n.clone());
            continue;
        };
        let y = &n.output[0];
        let (lo_name, hi_name, mid) = (
            format!("{y}.tern.lo"),
            format!("{y}.tern.hi"),
            format!("{y}.tern.max"),
        );
        for (name, v) in [(&lo_name, lo), (&hi_name, hi)] {
            let v = Values {
                shape: Vec::new(),
                data: vec![v],
            };
            bounds.push(float_tensor(name.clone(), v));
        }
        out.push(node(
            "Max",
            mid.clone(),
            vec![x, lo_name],
            vec![mid.clone()],
        ));
        out.push(node(
            "Min",
            format!("{y}.tern.min"),
            vec![mid, hi_name],
            vec![y.clone()],
        ));
        pairs += 1;
    }
    let read: HashSet<&str> = out
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .chain(keep.iter().copied())
        .collect();
    let read: HashSet<String> = read.into_iter().map(str::to_string).collect();
    out.retain(|n| {
        !(n.op_type == "QuantizeLinear"
            && n.domain.is_empty()
            && n.output.iter().all(|o| !read.contains(o)))
    });
    ((out, pairs), bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(shape: &[usize], data: &[f32]) -> Values {
        Values {
            shape: shape.to_vec(),
            data: data.to_vec(),
        }
    }

    #[test]
    fn dequantises_per_tensor_and_per_channel() {
        let x = values(&[2, 3], &[0., 1., 2., 10., 11., 12.]);
        let one = dequantise(&x, &values(&[], &[0.5]), Some(&values(&[], &[1.])), 1).unwrap();
        assert_eq!(one.data, vec![-0.5, 0., 0.5, 4.5, 5., 5.5]);
        // Per row (axis 0): scales 1 and 2, zero points 0 and 10.
        let rows = dequantise(
            &x,
            &values(&[2], &[1., 2.]),
            Some(&values(&[2], &[0., 10.])),
            0,
        )
        .unwrap();
        assert_eq!(rows.data, vec![0., 1., 2., 0., 2., 4.]);
        // Per column (axis 1).
        let cols = dequantise(&x, &values(&[3], &[1., 2., 3.]), None, 1).unwrap();
        assert_eq!(cols.data, vec![0., 2., 6., 10., 22., 36.]);
        // A scale per channel that matches no axis is refused, not guessed.
        assert!(dequantise(&x, &values(&[4], &[1.; 4]), None, 1).is_none());
    }

    fn tensor(name: &str, dt: DataType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: dt as i32,
            raw_data: raw,
            ..TensorProto::default()
        }
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// x → Q → QLinearMatMul(b) → DQ → y, with b constant int8.
    fn matmul_graph() -> GraphProto {
        GraphProto {
            node: vec![
                node(
                    "QuantizeLinear",
                    "q".into(),
                    vec!["x".into(), "s".into(), "z".into()],
                    vec!["xq".into()],
                ),
                node(
                    "QLinearMatMul",
                    "mm".into(),
                    ["xq", "s", "z", "b", "bs", "bz", "ys", "yz"]
                        .map(String::from)
                        .to_vec(),
                    vec!["yq".into()],
                ),
                node(
                    "DequantizeLinear",
                    "dq".into(),
                    vec!["yq".into(), "ys".into(), "yz".into()],
                    vec!["y".into()],
                ),
            ],
            initializer: vec![
                tensor("s", DataType::Float, &[], f32s(&[0.1])),
                tensor("z", DataType::Uint8, &[], vec![128]),
                tensor("b", DataType::Int8, &[2, 2], vec![1, 2, 254, 4]),
                tensor("bs", DataType::Float, &[], f32s(&[0.5])),
                tensor("bz", DataType::Int8, &[], vec![0]),
                tensor("ys", DataType::Float, &[], f32s(&[0.2])),
                tensor("yz", DataType::Uint8, &[], vec![128]),
            ],
            input: vec![tract_onnx::pb::ValueInfoProto {
                name: "x".into(),
                ..Default::default()
            }],
            output: vec![tract_onnx::pb::ValueInfoProto {
                name: "y".into(),
                ..Default::default()
            }],
            ..GraphProto::default()
        }
    }

    #[test]
    fn a_qlinear_matmul_becomes_a_float_matmul_between_the_pairs_it_leaves() {
        let mut g = matmul_graph();
        assert!(is_quantised(&g));
        let done = to_float(&mut g, None);
        assert_eq!(
            done,
            Rewritten {
                ops: 1,
                folded: 0,
                pairs: 1
            }
        );
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        // The input's quantise–dequantise pair is its clamp now; the output's stays (y is a
        // graph output, dequantised by the graph's own last node).
        assert_eq!(
            ops,
            ["Max", "Min", "MatMul", "QuantizeLinear", "DequantizeLinear"]
        );
        assert_eq!(g.node[0].input[0], "x");
        assert_eq!(g.node[2].input, ["yq.tern.a", "yq.tern.b"]);
        // uint8 with zero point 128 and scale 0.1: [-12.8, 12.7].
        let bound = |name: &str| {
            let t = g.initializer.iter().find(|t| t.name == name).unwrap();
            f32::from_le_bytes(t.raw_data[..4].try_into().unwrap())
        };
        assert!((bound("yq.tern.a.tern.lo") + 12.8).abs() < 1e-5);
        assert!((bound("yq.tern.a.tern.hi") - 12.7).abs() < 1e-5);
        assert_no_dangling(&g);
        let b = g
            .initializer
            .iter()
            .find(|t| t.name == "yq.tern.b")
            .unwrap();
        let floats: Vec<f32> = b
            .raw_data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // int8 254 is -2: (-2 - 0) * 0.5.
        assert_eq!(floats, vec![0.5, 1.0, -1.0, 2.0]);
        // The int8 weights are dropped; the scales still read are kept.
        assert!(g.initializer.iter().all(|t| t.name != "b"));
        assert!(g.initializer.iter().any(|t| t.name == "ys"));
    }

    #[test]
    fn a_pair_with_other_parameters_or_a_non_constant_weight_is_left_alone() {
        let mut g = matmul_graph();
        g.node[1].input[3] = "x".into(); // b is an activation
        let done = to_float(&mut g, None);
        assert!(!done.any(), "{done}");
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["QuantizeLinear", "QLinearMatMul", "DequantizeLinear"]);

        // The quantiser's scale is not the one the rewritten op dequantises with: the
        // values really are requantised, so the pair stays.
        let mut g = matmul_graph();
        g.node[0].input[1] = "ys".into();
        let done = to_float(&mut g, None);
        assert_eq!((done.ops, done.pairs), (1, 0));
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "QuantizeLinear",
                "DequantizeLinear",
                "MatMul",
                "QuantizeLinear",
                "DequantizeLinear"
            ]
        );
    }

    /// Every name a node reads is made by a node, an initializer or a graph input.
    fn assert_no_dangling(g: &GraphProto) {
        let made: HashSet<&str> = g
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .chain(g.initializer.iter().map(|t| t.name.as_str()))
            .chain(g.input.iter().map(|i| i.name.as_str()))
            .collect();
        for n in &g.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                assert!(
                    made.contains(i.as_str()),
                    "{} reads {i}, which nothing makes",
                    n.name
                );
            }
        }
        let names: HashSet<&str> = g.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names.len(), g.node.len(), "node names repeat");
    }

    /// Two unnamed QLinearConv in a row, with a bias, per-channel weights and a requantising
    /// quantise-dequantise chain between them; old-style initializers listed as inputs.
    #[test]
    fn unnamed_qlinear_convs_in_a_chain_become_float_convs_with_unique_names() {
        let conv = |x: &str, y: &str| {
            let mut n = node(
                "QLinearConv",
                String::new(),
                [x, "s", "z", "w", "ws", "wz", "s", "z", "bias"]
                    .map(String::from)
                    .to_vec(),
                vec![y.into()],
            );
            n.attribute.push(tract_onnx::pb::AttributeProto {
                name: "group".into(),
                i: 1,
                ..Default::default()
            });
            n
        };
        let mut g = GraphProto {
            node: vec![
                node(
                    "QuantizeLinear",
                    String::new(),
                    vec!["x".into(), "s".into(), "z".into()],
                    vec!["xq".into()],
                ),
                conv("xq", "c1"),
                node(
                    "DequantizeLinear",
                    String::new(),
                    vec!["c1".into(), "s".into(), "z".into()],
                    vec!["d1".into()],
                ),
                node(
                    "QuantizeLinear",
                    String::new(),
                    vec!["d1".into(), "s".into(), "z".into()],
                    vec!["q2".into()],
                ),
                conv("q2", "c2"),
                node(
                    "DequantizeLinear",
                    String::new(),
                    vec!["c2".into(), "s".into(), "z".into()],
                    vec!["d2".into()],
                ),
                node("Relu", String::new(), vec!["d2".into()], vec!["y".into()]),
            ],
            initializer: vec![
                tensor("s", DataType::Float, &[], f32s(&[0.5])),
                tensor("z", DataType::Uint8, &[], vec![0]),
                // Two output channels of one 1×1 kernel each, scales 1 and 2.
                tensor("w", DataType::Int8, &[2, 1, 1, 1], vec![3, 253]),
                tensor("ws", DataType::Float, &[2], f32s(&[1.0, 2.0])),
                tensor("wz", DataType::Int8, &[2], vec![0, 0]),
                tensor(
                    "bias",
                    DataType::Int32,
                    &[2],
                    [4i32, -4].iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            ],
            input: ["x", "s", "z", "w", "ws", "wz", "bias"]
                .iter()
                .map(|n| tract_onnx::pb::ValueInfoProto {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            output: vec![tract_onnx::pb::ValueInfoProto {
                name: "y".into(),
                ..Default::default()
            }],
            ..GraphProto::default()
        };
        let done = to_float(&mut g, None);
        assert_eq!((done.ops, done.pairs), (2, 4), "{done}");
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Max", "Min", "Conv", "Max", "Min", "Max", "Min", "Conv", "Max", "Min", "Relu"
            ]
        );
        assert_no_dangling(&g);
        let floats = |name: &str| -> Vec<f32> {
            let t = g.initializer.iter().find(|t| t.name == name).unwrap();
            t.raw_data
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        // Weights per output channel: 3·1 and (−3)·2; bias in units of 0.5 × (1, 2).
        assert_eq!(floats("c1.tern.w"), vec![3.0, -6.0]);
        assert_eq!(floats("c1.tern.b"), vec![2.0, -4.0]);
        assert!(
            g.node
                .iter()
                .any(|n| n.op_type == "Conv" && n.attribute.iter().any(|a| a.name == "group"))
        );
        // The int8 weights went, with their listing as graph inputs; x is still an input.
        let inputs: Vec<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
        assert!(
            !inputs.contains(&"w") && inputs.contains(&"x"),
            "{inputs:?}"
        );
    }

    #[test]
    fn what_a_subgraph_reads_from_the_outer_scope_is_kept() {
        // x → Q → DQ → xd → Relu, and an If whose branch reads xd and an int8 tensor b that
        // no node of the outer graph reads.
        let body = GraphProto {
            node: vec![node(
                "Add",
                "inner".into(),
                vec!["xd".into(), "b".into()],
                vec!["o".into()],
            )],
            ..GraphProto::default()
        };
        let mut branch = node("If", "if".into(), vec!["c".into()], vec!["r".into()]);
        branch.attribute.push(tract_onnx::pb::AttributeProto {
            name: "then_branch".into(),
            g: Some(body),
            ..Default::default()
        });
        let mut g = GraphProto {
            node: vec![
                node(
                    "QuantizeLinear",
                    "q".into(),
                    vec!["x".into(), "s".into(), "z".into()],
                    vec!["xq".into()],
                ),
                node(
                    "DequantizeLinear",
                    "dq".into(),
                    vec!["xq".into(), "s".into(), "z".into()],
                    vec!["xd".into()],
                ),
                node("Relu", "relu".into(), vec!["xd".into()], vec!["y".into()]),
                branch,
            ],
            initializer: vec![
                tensor("s", DataType::Float, &[], f32s(&[0.1])),
                tensor("z", DataType::Uint8, &[], vec![128]),
                tensor("b", DataType::Int8, &[1], vec![3]),
            ],
            ..GraphProto::default()
        };
        let done = to_float(&mut g, None);
        assert_eq!(done.pairs, 0, "{done}");
        assert!(g.node.iter().any(|n| n.output == ["xd"]));
        assert!(g.initializer.iter().any(|t| t.name == "b"));
    }

    #[test]
    fn a_dequantised_constant_is_folded_into_a_float_initializer() {
        let mut g = GraphProto {
            node: vec![
                node(
                    "DequantizeLinear",
                    "w".into(),
                    vec!["wq".into(), "ws".into()],
                    vec!["wf".into()],
                ),
                node(
                    "MatMul",
                    "mm".into(),
                    vec!["x".into(), "wf".into()],
                    vec!["y".into()],
                ),
            ],
            initializer: vec![
                tensor("wq", DataType::Int8, &[2], vec![4, 252]),
                tensor("ws", DataType::Float, &[], f32s(&[0.25])),
            ],
            ..GraphProto::default()
        };
        let done = to_float(&mut g, None);
        assert_eq!((done.folded, done.ops, done.pairs), (1, 0, 0));
        assert_eq!(g.node.len(), 1);
        let w = &g
            .initializer
            .iter()
            .find(|t| t.name == "wf")
            .unwrap()
            .raw_data;
        assert_eq!(w, &f32s(&[1.0, -1.0]));
        assert_eq!(
            g.initializer.len(),
            1,
            "the int8 weights and their scale are dropped"
        );
    }
}
