//! The iteration cost model the co-serving policy plans with: a packed forward's time and one
//! backward step's time, each a linear function of what it holds, fitted online from measured
//! times (exponentially weighted least squares, so the fit follows the machine as load, threads
//! and clocks change).
//!
//! A forward's inference part: `a0 + a1·tokens + a2·logit rows + a3·Σ len·(start + len)` — a
//! fixed part (reading the weights), a per-token part (the layers' matmuls), the LM head for
//! each row whose logits are wanted, and attention over each segment's context; fitted on
//! iterations without finetuning. A finetuning forward chunk of n tokens adds `c0 + c1·n` (its
//! layers, loss and gradient at the head), fitted on what iterations with a chunk took beyond
//! their inference part's prediction. Fitting the two apart keeps each well determined: mixed
//! iterations alone cannot tell a training token from an inference one. A backward (layer,
//! chunk) step: `b0 + b1·len + b2·len·(start + len)`.

/// What an inference segment of a forward holds, for the cost model.
#[derive(Debug, Clone, Copy)]
pub struct SegmentCost {
    /// First position and tokens.
    pub start: usize,
    pub len: usize,
    /// Rows of logits computed (0, 1 for the last token, or len).
    pub logits: usize,
}

/// Scales keep the normal equations well conditioned.
const TOKENS_UNIT: f64 = 100.0;
const ATTN_UNIT: f64 = 1e4;

/// Features of a forward's inference segments.
pub fn forward_features(segments: impl IntoIterator<Item = SegmentCost>) -> [f64; 4] {
    let mut x = [1.0, 0.0, 0.0, 0.0];
    for s in segments {
        x[1] += s.len as f64 / TOKENS_UNIT;
        x[2] += s.logits as f64 / TOKENS_UNIT;
        x[3] += (s.len * (s.start + s.len)) as f64 / ATTN_UNIT;
    }
    x
}

/// Features of one backward step over the chunk at `start` of `len` tokens.
pub fn backward_features(start: usize, len: usize) -> [f64; 3] {
    [
        1.0,
        len as f64 / TOKENS_UNIT,
        (len * (start + len)) as f64 / ATTN_UNIT,
    ]
}

/// Exponentially weighted least squares for `y ≈ θ·x`, with a small ridge so that directions
/// the data never varied stay at zero instead of blowing up.
#[derive(Debug, Clone)]
pub struct LinearFit<const N: usize> {
    a: [[f64; N]; N],
    b: [f64; N],
    theta: [f64; N],
    observations: u64,
    forget: f64,
}

impl<const N: usize> Default for LinearFit<N> {
    fn default() -> Self {
        Self::new(0.98)
    }
}

impl<const N: usize> LinearFit<N> {
    /// `forget`: the weight of the past per observation (0.98 remembers ~50 observations).
    pub fn new(forget: f64) -> Self {
        Self {
            a: [[0.0; N]; N],
            b: [0.0; N],
            theta: [0.0; N],
            observations: 0,
            forget,
        }
    }

    pub fn observations(&self) -> u64 {
        self.observations
    }

    pub fn coefficients(&self) -> [f64; N] {
        self.theta
    }

    /// Predicted seconds (never negative; zero before any observation).
    pub fn predict(&self, x: &[f64; N]) -> f64 {
        dot(&self.theta, x).max(0.0)
    }

    pub fn observe(&mut self, x: &[f64; N], seconds: f64) {
        if !seconds.is_finite() {
            return;
        }
        for i in 0..N {
            for j in 0..N {
                self.a[i][j] = self.forget * self.a[i][j] + x[i] * x[j];
            }
            self.b[i] = self.forget * self.b[i] + x[i] * seconds;
        }
        self.observations += 1;
        let trace: f64 = (0..N).map(|i| self.a[i][i]).sum();
        let mut m = self.a;
        for (i, row) in m.iter_mut().enumerate() {
            row[i] += 1e-8 * trace.max(1e-12);
        }
        if let Some(theta) = solve(m, self.b) {
            self.theta = theta;
        }
    }
}

fn dot<const N: usize>(a: &[f64; N], b: &[f64; N]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `m·x = b` by Gaussian elimination with partial pivoting.
fn solve<const N: usize>(mut m: [[f64; N]; N], mut b: [f64; N]) -> Option<[f64; N]> {
    for col in 0..N {
        let pivot = (col..N).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
        if m[pivot][col].abs() < 1e-300 {
            return None;
        }
        m.swap(col, pivot);
        b.swap(col, pivot);
        let (pivot_row, bp) = (m[col], b[col]);
        for (row, br) in m.iter_mut().zip(b.iter_mut()).skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (x, p) in row.iter_mut().zip(pivot_row).skip(col) {
                *x -= f * p;
            }
            *br -= f * bp;
        }
    }
    let mut x = [0.0; N];
    for r in (0..N).rev() {
        let s: f64 = (r + 1..N).map(|c| m[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / m[r][r];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// The engine's fits.
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    pub forward: LinearFit<4>,
    pub chunk: LinearFit<2>,
    pub backward: LinearFit<3>,
}

impl CostModel {
    /// Seconds for a forward of inference segments with features `x` and, if given, a
    /// finetuning chunk of that many tokens.
    pub fn predict_forward(&self, x: &[f64; 4], chunk: Option<usize>) -> f64 {
        self.forward.predict(x) + chunk.map_or(0.0, |n| self.chunk.predict(&chunk_features(n)))
    }

    pub fn observe_forward(&mut self, x: &[f64; 4], chunk: Option<usize>, seconds: f64) {
        match chunk {
            None => self.forward.observe(x, seconds),
            Some(n) => {
                let extra = seconds - self.forward.predict(x);
                self.chunk.observe(&chunk_features(n), extra);
            }
        }
    }
}

fn chunk_features(n: usize) -> [f64; 2] {
    [1.0, n as f64 / TOKENS_UNIT]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: usize, len: usize, logits: usize) -> SegmentCost {
        SegmentCost { start, len, logits }
    }

    #[test]
    fn recovers_a_linear_cost_exactly() {
        let coef = [2e-3, 0.5e-3, 3e-3, 0.3e-3];
        let truth = |x: &[f64; 4]| dot(&coef, x);
        let mut fit = LinearFit::<4>::default();
        for k in 0..300usize {
            let x = forward_features([
                seg(k % 97, 1, 1),
                seg(k % 31, 1 + k % 13, (k % 3 == 0) as usize),
                seg((k * 5) % 64, 1 + (k * 7) % 120, 0),
            ]);
            fit.observe(&x, truth(&x));
        }
        let x = forward_features([seg(300, 64, 0), seg(10, 1, 1)]);
        let rel = (fit.predict(&x) - truth(&x)).abs() / truth(&x);
        assert!(rel < 1e-5, "relative error {rel}");
    }

    #[test]
    fn a_chunk_is_priced_apart_from_the_inference_beside_it() {
        // Inference: 5 ms + 1 ms per decode row; a chunk of n tokens adds 2 ms + 0.3 ms/token.
        let inference = |d: usize| 5e-3 + 1e-3 * d as f64;
        let chunk = |n: usize| 2e-3 + 0.3e-3 * n as f64;
        let decodes = |d: usize| forward_features((0..d).map(|i| seg(10 + i, 1, 1)));
        let mut m = CostModel::default();
        for k in 0..200usize {
            let d = 1 + k % 16;
            let x = decodes(d);
            if k % 4 == 0 {
                let n = 16 + (k * 7) % 112;
                m.observe_forward(&x, Some(n), inference(d) + chunk(n));
            } else {
                m.observe_forward(&x, None, inference(d));
            }
        }
        let (d, n) = (9, 100);
        let want = inference(d) + chunk(n);
        let got = m.predict_forward(&decodes(d), Some(n));
        // Early chunk observations were measured against a still-converging inference fit.
        assert!((got - want).abs() / want < 1e-2, "{got} vs {want}");
    }

    #[test]
    fn an_unvaried_feature_stays_harmless() {
        // Every observation has the same shape: the fit must still predict it.
        let mut fit = LinearFit::<3>::default();
        let x = backward_features(0, 128);
        for _ in 0..50 {
            fit.observe(&x, 0.010);
        }
        assert!((fit.predict(&x) - 0.010).abs() < 1e-6);
        assert!(fit.coefficients().iter().all(|c| c.is_finite()));
    }

    #[test]
    fn follows_a_machine_that_slows_down() {
        let mut fit = LinearFit::<3>::default();
        let xs: Vec<[f64; 3]> = (1..40).map(|n| backward_features(n, n * 5)).collect();
        for x in xs.iter().cycle().take(200) {
            fit.observe(x, 1e-3 + 1e-3 * x[1]);
        }
        for x in xs.iter().cycle().take(400) {
            fit.observe(x, 2.0 * (1e-3 + 1e-3 * x[1]));
        }
        let x = &xs[10];
        let want = 2.0 * (1e-3 + 1e-3 * x[1]);
        assert!((fit.predict(x) - want).abs() / want < 1e-3);
    }
}
