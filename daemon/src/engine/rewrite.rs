//! The `tract+float` plan's load-time rewrite of a quantised ONNX graph: int8 on the wire and
//! on disk, float in the kernel.
//!
//! ```text
//!  QLinearConv(x, w_i8, b_i32)  ─►  DequantizeLinear(x) ─► Conv(w_f32, b_f32) ─► QuantizeLinear
//!  QLinearMatMul(a, b_i8)       ─►  DequantizeLinear(a) ─► MatMul(b_f32)      ─► QuantizeLinear
//!  DequantizeLinear(constant)   ─►  a float initializer
//!  QuantizeLinear ─► DequantizeLinear (same scale and zero point)  ─►  removed: x stays float
//! ```
//!
//! On x86, tract has no int8 matrix-vector kernel and quantises and dequantises activations
//! element by element, so a quantised model runs several times slower than its float form
//! (a QDQ model, 17× on PP-OCR's classifier). Rewritten, it runs as the float model would with
//! the package's dequantised weights. The outputs are not the int8 model's to the bit: the
//! activations are no longer rounded to the int8 grid. The package's golden vectors decide,
//! as for every plan, whether that is close enough to serve.
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

/// The graph's constant tensors by name: initializers (unless a graph input of the same name
/// may override them) and `Constant` nodes' values. Loaded when first asked for.
struct Constants<'a> {
    protos: HashMap<&'a str, &'a TensorProto>,
    dir: Option<&'a str>,
}

impl<'a> Constants<'a> {
    fn new(g: &'a GraphProto, dir: Option<&'a str>) -> Constants<'a> {
        let inputs: HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
        let mut protos: HashMap<&str, &TensorProto> = g
            .initializer
            .iter()
            .filter(|t| !inputs.contains(t.name.as_str()))
            .map(|t| (t.name.as_str(), t))
            .collect();
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
    }
    // Names the bodies of If, Loop and Scan read from this graph's scope: kept as they are.
    let mut outer = HashSet::new();
    for n in &g.node {
        subgraph_reads(n, &mut outer);
    }
    done.pairs = strip_pairs(&mut nodes, g, &outer);
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
    g.initializer.retain(|t| used.contains(&t.name));
    g.node.retain(|n| {
        !(n.op_type == "Constant"
            && n.domain.is_empty()
            && n.output.iter().all(|o| !used.contains(o)))
    });
    done
}

/// A `DequantizeLinear` of constants, computed: the float initializer that replaces it.
fn fold_dequantise(n: &NodeProto, consts: &Constants<'_>) -> Option<TensorProto> {
    if int_attr(n, "block_size").is_some_and(|b| b != 0) {
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
        n.name.clone(),
        conv_in,
        vec![format!("{out}.tern.y")],
    );
    conv.attribute = n.attribute.clone();
    Some((
        vec![
            node(
                "DequantizeLinear",
                format!("{}.tern.dq", n.name),
                vec![x.clone(), x_scale.clone(), x_zero.clone()],
                vec![format!("{out}.tern.x")],
            ),
            conv,
            node(
                "QuantizeLinear",
                format!("{}.tern.q", n.name),
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
                format!("{}.tern.dq", n.name),
                vec![a.clone(), a_scale.clone(), a_zero.clone()],
                vec![format!("{out}.tern.a")],
            ),
            node(
                "MatMul",
                n.name.clone(),
                vec![format!("{out}.tern.a"), format!("{out}.tern.b")],
                vec![format!("{out}.tern.y")],
            ),
            node(
                "QuantizeLinear",
                format!("{}.tern.q", n.name),
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

/// Remove each `DequantizeLinear` that undoes a `QuantizeLinear` with the same scale and zero
/// point (its readers take the quantiser's float input instead), then the quantisers nothing
/// reads any more. A pair whose output is a graph output, or is read by a subgraph, stays.
/// Returns the pairs removed.
fn strip_pairs(nodes: &mut Vec<NodeProto>, g: &GraphProto, outer: &HashSet<String>) -> usize {
    let graph_outputs: HashSet<&str> = g
        .output
        .iter()
        .map(|o| o.name.as_str())
        .chain(outer.iter().map(String::as_str))
        .collect();
    let quantisers: HashMap<&str, &NodeProto> = nodes
        .iter()
        .filter(|n| n.op_type == "QuantizeLinear" && n.domain.is_empty())
        .filter_map(|n| Some((n.output.first()?.as_str(), n)))
        .collect();
    let same_params = |q: &NodeProto, dq: &NodeProto| {
        q.input.get(1) == dq.input.get(1)
            && q.input.get(2).filter(|s| !s.is_empty()) == dq.input.get(2).filter(|s| !s.is_empty())
            && int_attr(q, "axis") == int_attr(dq, "axis")
            && int_attr(q, "block_size").unwrap_or(0) == 0
            && int_attr(dq, "block_size").unwrap_or(0) == 0
    };
    let mut alias: HashMap<String, String> = HashMap::new();
    for dq in nodes.iter() {
        if dq.op_type != "DequantizeLinear" || !dq.domain.is_empty() {
            continue;
        }
        let (Some(input), Some(out)) = (dq.input.first(), dq.output.first()) else {
            continue;
        };
        if graph_outputs.contains(out.as_str()) {
            continue;
        }
        if let Some(q) = quantisers.get(input.as_str())
            && same_params(q, dq)
            && let Some(x) = q.input.first()
        {
            alias.insert(out.clone(), x.clone());
        }
    }
    if alias.is_empty() {
        return 0;
    }
    nodes.retain(|n| !n.output.first().is_some_and(|o| alias.contains_key(o)));
    for n in nodes.iter_mut() {
        for i in n.input.iter_mut() {
            if let Some(x) = alias.get(i) {
                *i = x.clone();
            }
        }
    }
    let read: HashSet<String> = nodes
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph_outputs.iter().map(|s| s.to_string()))
        .collect();
    nodes.retain(|n| {
        !(n.op_type == "QuantizeLinear"
            && n.domain.is_empty()
            && n.output.iter().all(|o| !read.contains(o)))
    });
    alias.len()
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
        // The input's quantise–dequantise pair is gone; the output's stays (y is read as
        // quantised then dequantised by the graph's own last node).
        assert_eq!(ops, ["MatMul", "QuantizeLinear", "DequantizeLinear"]);
        assert_eq!(g.node[0].input, ["x", "yq.tern.b"]);
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
