//! A decoder layer's training forward and backward written out by hand, for the CPU in f32:
//! what `step.rs` otherwise builds from candle ops and differentiates with candle's autograd.
//! Same math (`Llama::layer_segments`), but each piece is one pass over plain buffers — the
//! projections through `tandem_kernels::matmul` (the frozen weights read in place, a LoRA's
//! term folded into its projection's pass), the element-wise work row by row (`rows.rs`),
//! attention one head per task (`attention.rs`) — instead of dozens of tensor ops, each
//! allocated and recorded for autograd, most of them on one thread.
//!
//! `layer_forward` keeps what the backward needs (`LayerActs`: normed inputs, projections,
//! attention probabilities, the MLP's activations, each LoRA's `x·Aᵀ`); `layer_backward`
//! takes the output gradient (plus what later chunks left for the segment's own keys and
//! values) and gives the input gradient, the gradients of the keys and values before the
//! segment, and the LoRA gradients. Oracle: candle autograd over the same layer
//! (`crates/tandem-model/tests/finetune.rs`, through `Llama::layer_backward`).

mod attention;
pub(crate) mod head;
mod host;
mod rows;

use super::step::{ChunkGrads, LayerLora, Segment};
use crate::error::{ModelError, Result};
use crate::llama::{Layer, Llama};
use crate::lora::Proj;
use candle_core::{DType, Tensor};
pub(crate) use host::to_vec as host_vec;
use host::HostF32;
use rayon::prelude::*;
use std::collections::HashMap;
use tandem_kernels::matmul::{gemm, gemm_sum, xwt, Mat};

/// Whether `model`'s layers can take this path: host memory, f32 weights.
pub(crate) fn supported(model: &Llama) -> bool {
    model.device().is_cpu() && model.dtype() == DType::F32
}

/// One segment's part of a layer's saved activations.
struct SegActs {
    shape: attention::Shape,
    /// First row of the segment in the layer's rows.
    row: usize,
    /// Keys (after RoPE) and values of the whole context [ctx, kv dim]: the positions before the
    /// segment, then its own.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities per head [len, ctx].
    probs: Vec<Vec<f32>>,
}

/// What `layer_backward` needs of a layer's forward over some rows.
pub struct LayerActs {
    layer: usize,
    rows: usize,
    segs: Vec<SegActs>,
    x: Vec<f32>,
    rms1: Vec<f32>,
    h1: Vec<f32>,
    /// Queries after RoPE [rows, q dim].
    q: Vec<f32>,
    /// Attention output [rows, q dim] (o_proj's input).
    o: Vec<f32>,
    x2: Vec<f32>,
    rms2: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// σ(gate).
    sig: Vec<f32>,
    /// silu(gate) · up, down_proj's input.
    m: Vec<f32>,
    /// Per LoRA projection: its input times Aᵀ [rows, r].
    lora_u: HashMap<Proj, Vec<f32>>,
}

impl LayerActs {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let seg: usize = self
            .segs
            .iter()
            .map(|s| s.k.len() + s.v.len() + s.probs.iter().map(Vec::len).sum::<usize>())
            .sum();
        let own = [
            &self.x, &self.rms1, &self.h1, &self.q, &self.o, &self.x2, &self.rms2, &self.h2,
            &self.gate, &self.up, &self.sig, &self.m,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>();
        let lora: usize = self.lora_u.values().map(Vec::len).sum();
        (seg + own + lora) * 4
    }
}

/// A projection's frozen weight (and bias) and, if trained, its LoRA weights, as host slices.
struct ProjWeights<'a> {
    p: Proj,
    w: HostF32<'a>,
    bias: Option<HostF32<'a>>,
    /// A [r, in], B [out, r], scale.
    lora: Option<(Vec<f32>, Vec<f32>, f32)>,
    out: usize,
    inp: usize,
}

impl<'a> ProjWeights<'a> {
    fn new(p: Proj, lin: &'a candle_nn::Linear, lora: &LayerLora) -> Result<Self> {
        let (out, inp) = lin.weight().dims2()?;
        let lora = match lora.modules.get(&p) {
            Some((a, b, s)) => Some((host::to_vec(a)?, host::to_vec(b)?, *s as f32)),
            None => None,
        };
        Ok(Self {
            p,
            w: HostF32::new(lin.weight())?,
            bias: lin.bias().map(HostF32::new).transpose()?,
            lora,
            out,
            inp,
        })
    }

    fn rank(&self) -> usize {
        self.lora.as_ref().map_or(0, |(a, _, _)| a.len() / self.inp)
    }

    /// `x · Wᵀ (+ bias) + s · (x · Aᵀ) · Bᵀ` over `t` rows; keeps `x · Aᵀ` in `saved`.
    fn forward(&self, x: &[f32], t: usize, saved: &mut HashMap<Proj, Vec<f32>>) -> Vec<f32> {
        let (out, inp) = (self.out, self.inp);
        let frozen = (
            Mat::new(x, t, inp),
            Mat::new(self.w.get(), out, inp).t(),
            1.0,
        );
        let mut y = vec![0f32; t * out];
        match &self.lora {
            Some((a, b, s)) => {
                let r = self.rank();
                let u = xwt(x, a, t, r, inp);
                // One pass over y for both terms.
                let lora = (Mat::new(&u, t, r), Mat::new(b, out, r).t(), *s);
                gemm_sum(&mut y, out, false, &[frozen, lora]);
                saved.insert(self.p, u);
            }
            None => gemm_sum(&mut y, out, false, &[frozen]),
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(out) {
                row.iter_mut().zip(b.get()).for_each(|(y, b)| *y += b);
            }
        }
        y
    }

    /// Adds `dy · W` (and the LoRA path's input gradient) to `dx`, and returns the LoRA
    /// gradients (dA [r, in], dB [out, r]) if the projection is trained. `x` is the forward's
    /// input, `u` its saved `x · Aᵀ`.
    fn backward(
        &self,
        dy: &[f32],
        x: &[f32],
        u: Option<&Vec<f32>>,
        t: usize,
        dx: &mut [f32],
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let (out, inp) = (self.out, self.inp);
        let dy_m = Mat::new(dy, t, out);
        let frozen = (dy_m, Mat::new(self.w.get(), out, inp), 1.0);
        let Some((a, b, s)) = &self.lora else {
            gemm_sum(dx, inp, true, &[frozen]);
            return Ok(None);
        };
        let u = u.ok_or_else(|| {
            ModelError::Batch(format!("no saved LoRA input for {}", self.p.name()))
        })?;
        let r = self.rank();
        // du = s·dy·B, as dy·(Bᵀ)ᵀ: both operands then run along `out` (a narrow product).
        let mut bt = vec![0f32; r * out];
        for (o, row) in b.chunks(r).enumerate() {
            for (j, v) in row.iter().enumerate() {
                bt[j * out + o] = *v;
            }
        }
        let mut du = vec![0f32; t * r];
        gemm(&mut du, r, false, dy_m, Mat::new(&bt, r, out).t(), *s);
        // dx += dy·W + du·A in one pass over dx.
        gemm_sum(
            dx,
            inp,
            true,
            &[frozen, (Mat::new(&du, t, r), Mat::new(a, r, inp), 1.0)],
        );
        // dB = s·dyᵀ·u, formed as its transpose s·uᵀ·dy (r rows against dy's rows as they
        // lie), and dA = duᵀ·x likewise.
        let mut db_t = vec![0f32; r * out];
        gemm(&mut db_t, out, false, Mat::new(u, t, r).t(), dy_m, *s);
        let mut db = vec![0f32; out * r];
        for (j, row) in db_t.chunks(out).enumerate() {
            for (o, v) in row.iter().enumerate() {
                db[o * r + j] = *v;
            }
        }
        let mut da = vec![0f32; r * inp];
        gemm(
            &mut da,
            inp,
            false,
            Mat::new(&du, t, r).t(),
            Mat::new(x, t, inp),
            1.0,
        );
        Ok(Some((da, db)))
    }
}

/// The layer's projections, in `Proj::ALL` order.
fn projections<'a>(layer: &'a Layer, lora: &LayerLora) -> Result<[ProjWeights<'a>; 7]> {
    let w = |p: Proj, lin: &'a candle_nn::Linear| ProjWeights::new(p, lin, lora);
    Ok([
        w(Proj::Q, &layer.q)?,
        w(Proj::K, &layer.k)?,
        w(Proj::V, &layer.v)?,
        w(Proj::O, &layer.o)?,
        w(Proj::Gate, &layer.gate)?,
        w(Proj::Up, &layer.up)?,
        w(Proj::Down, &layer.down)?,
    ])
}

/// Per row: its position.
fn positions(segs: &[Segment]) -> Vec<usize> {
    segs.iter().flat_map(|s| s.start..s.start + s.len).collect()
}

/// Layer `l` over the rows `x` [Σ len, hidden] of `segs` (each attending to its own keys
/// and the `k_prev` / `v_prev` before it). Returns the output rows and what the backward needs.
pub(crate) fn layer_forward(
    model: &Llama,
    l: usize,
    x: Vec<f32>,
    segs: &[Segment],
    lora: &LayerLora,
) -> Result<(Vec<f32>, LayerActs)> {
    let cfg = &model.cfg;
    let (h, nh, nkv, hd) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let (qd, kvd) = (nh * hd, nkv * hd);
    let t: usize = segs.iter().map(|s| s.len).sum();
    if x.len() != t * h || segs.is_empty() {
        return Err(ModelError::Batch(format!(
            "segments of {:?} rows over {} values of a {h}-wide layer",
            segs.iter().map(|s| s.len).collect::<Vec<_>>(),
            x.len()
        )));
    }
    let layer = model.layers.get(l).ok_or_else(|| {
        ModelError::Batch(format!(
            "no layer {l} in a {}-layer model",
            cfg.num_hidden_layers
        ))
    })?;
    let eps = cfg.rms_norm_eps as f32;
    let projs = projections(layer, lora)?;
    let [pq, pk, pv, po, pg, pu, pd] = &projs;
    let mut lora_u = HashMap::new();
    let (h1, rms1) = rows::rms_norm(&x, &host::to_vec(&layer.input_norm)?, eps);
    let mut q = pq.forward(&h1, t, &mut lora_u);
    let mut k = pk.forward(&h1, t, &mut lora_u);
    let v = pv.forward(&h1, t, &mut lora_u);
    let pos = positions(segs);
    let (cos, sin) = (HostF32::new(&model.cos)?, HostF32::new(&model.sin)?);
    rows::rope(&mut q, nh, hd, &pos, cos.get(), sin.get(), false);
    rows::rope(&mut k, nkv, hd, &pos, cos.get(), sin.get(), false);
    let mut o = vec![0f32; t * qd];
    // Each segment's keys and values (after those before it), then every segment's heads in
    // one parallel section (a packed unit's short examples: one section, not one per example).
    let mut inputs = Vec::with_capacity(segs.len());
    let mut row = 0;
    for s in segs {
        let shape = attention::Shape {
            len: s.len,
            start: s.start,
            heads: nh,
            kv_heads: nkv,
            hd,
            window: cfg.sliding_window,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let mut ks = Vec::with_capacity(shape.ctx() * kvd);
        let mut vs = Vec::with_capacity(shape.ctx() * kvd);
        if s.start > 0 {
            match (s.k_prev, s.v_prev) {
                (Some(kp), Some(vp)) if kp.elem_count() == s.start * kvd => {
                    ks.extend(host::to_vec(kp)?);
                    vs.extend(host::to_vec(vp)?);
                }
                _ => {
                    return Err(ModelError::Batch(format!(
                        "a segment at position {} needs the keys and values of the {} before it",
                        s.start, s.start
                    )))
                }
            }
        }
        ks.extend_from_slice(&k[row * kvd..(row + s.len) * kvd]);
        vs.extend_from_slice(&v[row * kvd..(row + s.len) * kvd]);
        inputs.push((shape, row, ks, vs));
        row += s.len;
    }
    let outs: Vec<_> = inputs
        .par_iter()
        .map(|(shape, row, ks, vs)| {
            attention::forward(*shape, &q[row * qd..(row + shape.len) * qd], ks, vs)
        })
        .collect();
    let mut seg_acts = Vec::with_capacity(segs.len());
    for ((shape, row, ks, vs), (out, probs)) in inputs.into_iter().zip(outs) {
        o[row * qd..(row + shape.len) * qd].copy_from_slice(&out);
        seg_acts.push(SegActs {
            shape,
            row,
            k: ks,
            v: vs,
            probs,
        });
    }
    let mut x2 = po.forward(&o, t, &mut lora_u);
    rows::add_into(&mut x2, &x);
    let (h2, rms2) = rows::rms_norm(&x2, &host::to_vec(&layer.post_norm)?, eps);
    let gate = pg.forward(&h2, t, &mut lora_u);
    let up = pu.forward(&h2, t, &mut lora_u);
    let (m, sig) = rows::swiglu(&gate, &up);
    let mut out = pd.forward(&m, t, &mut lora_u);
    rows::add_into(&mut out, &x2);
    Ok((
        out,
        LayerActs {
            layer: l,
            rows: t,
            segs: seg_acts,
            x,
            rms1,
            h1,
            q,
            o,
            x2,
            rms2,
            h2,
            gate,
            up,
            sig,
            m,
            lora_u,
        },
    ))
}

/// The backward of `layer_forward`: `d_out` [rows, hidden] the gradient of the layer's output,
/// `d_kv` (for a single segment) what later chunks contributed to the gradients of the
/// segment's own keys (after RoPE) and values [len, kv dim]. `d_k_prev` / `d_v_prev` of the
/// result are the first segment's.
pub(crate) fn layer_backward(
    model: &Llama,
    acts: LayerActs,
    mut d_out: Vec<f32>,
    d_kv: Option<(&[f32], &[f32])>,
    lora: &LayerLora,
) -> Result<ChunkGrads> {
    let cfg = &model.cfg;
    let (h, nh, nkv, hd, inter) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    );
    let (qd, kvd, t) = (nh * hd, nkv * hd, acts.rows);
    if d_out.len() != t * h {
        return Err(ModelError::Batch(format!(
            "an output gradient of {} values for {t} rows of {h}",
            d_out.len()
        )));
    }
    if d_kv.is_some() && acts.segs.len() != 1 {
        return Err(ModelError::Batch(
            "key/value gradients from later chunks need a single segment".into(),
        ));
    }
    let layer = &model.layers[acts.layer];
    let projs = projections(layer, lora)?;
    let [pq, pk, pv, po, pg, pu, pd] = &projs;
    let dev = model.device();
    let mut lora_grads = HashMap::new();
    let mut keep = |p: &ProjWeights, g: Option<(Vec<f32>, Vec<f32>)>| -> Result<()> {
        if let Some((da, db)) = g {
            let r = p.rank();
            lora_grads.insert(
                p.p,
                (
                    Tensor::from_vec(da, (r, p.inp), dev)?,
                    Tensor::from_vec(db, (p.out, r), dev)?,
                ),
            );
        }
        Ok(())
    };
    let u = |p: Proj| acts.lora_u.get(&p);
    // MLP: out = x2 + down(silu(gate(h2)) · up(h2)); d_out is also x2's gradient so far.
    let mut dm = vec![0f32; t * inter];
    keep(pd, pd.backward(&d_out, &acts.m, u(Proj::Down), t, &mut dm)?)?;
    let du = rows::swiglu_backward(&mut dm, &acts.gate, &acts.up, &acts.sig);
    let mut dh2 = vec![0f32; t * h];
    keep(pg, pg.backward(&dm, &acts.h2, u(Proj::Gate), t, &mut dh2)?)?;
    keep(pu, pu.backward(&du, &acts.h2, u(Proj::Up), t, &mut dh2)?)?;
    drop((dm, du));
    let post = host::to_vec(&layer.post_norm)?;
    rows::rms_norm_backward(&mut d_out, &dh2, &acts.x2, &acts.rms2, &post);
    let dx2 = d_out;
    // Attention: x2 = x + o_proj(attention(rope(q(h1)), rope(k(h1)), v(h1))).
    let mut d_o = vec![0f32; t * qd];
    keep(po, po.backward(&dx2, &acts.o, u(Proj::O), t, &mut d_o)?)?;
    let mut dq = vec![0f32; t * qd];
    let mut dk = vec![0f32; t * kvd];
    let mut dv = vec![0f32; t * kvd];
    let (mut d_k_prev, mut d_v_prev) = (None, None);
    // Every segment's heads in one parallel section, then their gradients into place.
    let grads: Vec<_> = acts
        .segs
        .par_iter()
        .map(|s| {
            let (len, row) = (s.shape.len, s.row);
            attention::backward(
                s.shape,
                &acts.q[row * qd..(row + len) * qd],
                &s.k,
                &s.v,
                &s.probs,
                &d_o[row * qd..(row + len) * qd],
            )
        })
        .collect();
    for (i, (s, g)) in acts.segs.iter().zip(grads).enumerate() {
        let (len, start, row) = (s.shape.len, s.shape.start, s.row);
        dq[row * qd..(row + len) * qd].copy_from_slice(&g.dq);
        dk[row * kvd..(row + len) * kvd].copy_from_slice(&g.dk[start * kvd..]);
        dv[row * kvd..(row + len) * kvd].copy_from_slice(&g.dv[start * kvd..]);
        if i == 0 && start > 0 {
            let shape = (start, nkv, hd);
            d_k_prev = Some(Tensor::from_vec(g.dk[..start * kvd].to_vec(), shape, dev)?);
            d_v_prev = Some(Tensor::from_vec(g.dv[..start * kvd].to_vec(), shape, dev)?);
        }
    }
    if let Some((gk, gv)) = d_kv {
        dk.iter_mut().zip(gk).for_each(|(a, b)| *a += b);
        dv.iter_mut().zip(gv).for_each(|(a, b)| *a += b);
    }
    let pos: Vec<usize> = acts
        .segs
        .iter()
        .flat_map(|s| s.shape.start..s.shape.ctx())
        .collect();
    let (cos, sin) = (HostF32::new(&model.cos)?, HostF32::new(&model.sin)?);
    rows::rope(&mut dq, nh, hd, &pos, cos.get(), sin.get(), true);
    rows::rope(&mut dk, nkv, hd, &pos, cos.get(), sin.get(), true);
    let mut dh1 = vec![0f32; t * h];
    keep(pq, pq.backward(&dq, &acts.h1, u(Proj::Q), t, &mut dh1)?)?;
    keep(pk, pk.backward(&dk, &acts.h1, u(Proj::K), t, &mut dh1)?)?;
    keep(pv, pv.backward(&dv, &acts.h1, u(Proj::V), t, &mut dh1)?)?;
    let mut dx = dx2;
    let input = host::to_vec(&layer.input_norm)?;
    rows::rms_norm_backward(&mut dx, &dh1, &acts.x, &acts.rms1, &input);
    Ok(ChunkGrads {
        d_x: Tensor::from_vec(dx, (t, h), dev)?,
        d_k_prev,
        d_v_prev,
        lora: lora_grads,
    })
}
