//! The iteration cost model the co-serving policy plans with: a packed forward's time and one
//! backward step's time, each a linear function of what it holds, fitted online from measured
//! times (exponentially weighted least squares, so the fit follows the machine as load, threads
//! and clocks change).
//!
//! Forward: `a0 + a1·tokens + a2·Σ len·(start + len)` — a fixed part (reading the weights), a
//! per-token part (the matmuls) and attention over each segment's context. A backward (layer,
//! chunk) step: `b0 + b1·len + b2·len·(start + len)`, on the same features of its chunk.

/// Features of some work (what the linear model multiplies).
pub type Features = [f64; 3];

/// Scales keep the normal equations well conditioned.
const TOKENS_UNIT: f64 = 100.0;
const ATTN_UNIT: f64 = 1e4;

/// Features of a forward over segments given as (first position, tokens).
pub fn forward_features(segments: impl IntoIterator<Item = (usize, usize)>) -> Features {
    let (mut tokens, mut attn) = (0.0, 0.0);
    for (start, len) in segments {
        tokens += len as f64;
        attn += (len * (start + len)) as f64;
    }
    [1.0, tokens / TOKENS_UNIT, attn / ATTN_UNIT]
}

/// Features of one backward step over the chunk at `start` of `len` tokens.
pub fn backward_features(start: usize, len: usize) -> Features {
    forward_features([(start, len)])
}

/// Exponentially weighted least squares for `y ≈ θ·x`, with a small ridge so that directions
/// the data never varied stay at zero instead of blowing up.
#[derive(Debug, Clone)]
pub struct LinearFit {
    a: [[f64; 3]; 3],
    b: Features,
    theta: Features,
    observations: u64,
    forget: f64,
}

impl Default for LinearFit {
    fn default() -> Self {
        Self::new(0.98)
    }
}

impl LinearFit {
    /// `forget`: the weight of the past per observation (0.98 remembers ~50 observations).
    pub fn new(forget: f64) -> Self {
        Self {
            a: [[0.0; 3]; 3],
            b: [0.0; 3],
            theta: [0.0; 3],
            observations: 0,
            forget,
        }
    }

    pub fn observations(&self) -> u64 {
        self.observations
    }

    pub fn coefficients(&self) -> Features {
        self.theta
    }

    /// Predicted seconds (never negative; zero before any observation).
    pub fn predict(&self, x: &Features) -> f64 {
        dot(&self.theta, x).max(0.0)
    }

    pub fn observe(&mut self, x: &Features, seconds: f64) {
        if !seconds.is_finite() {
            return;
        }
        for i in 0..3 {
            for j in 0..3 {
                self.a[i][j] = self.forget * self.a[i][j] + x[i] * x[j];
            }
            self.b[i] = self.forget * self.b[i] + x[i] * seconds;
        }
        self.observations += 1;
        let trace = self.a[0][0] + self.a[1][1] + self.a[2][2];
        let mut m = self.a;
        for (i, row) in m.iter_mut().enumerate() {
            row[i] += 1e-8 * trace.max(1e-12);
        }
        if let Some(theta) = solve3(m, self.b) {
            self.theta = theta;
        }
    }
}

fn dot(a: &Features, b: &Features) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `m·x = b` by Gaussian elimination with partial pivoting.
fn solve3(mut m: [[f64; 3]; 3], mut b: Features) -> Option<Features> {
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
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
    let mut x = [0.0; 3];
    for r in (0..3).rev() {
        let s: f64 = (r + 1..3).map(|c| m[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / m[r][r];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// The engine's two fits.
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    pub forward: LinearFit,
    pub backward: LinearFit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_linear_cost_exactly() {
        // 2 ms fixed + 0.5 ms per 100 tokens + 0.3 ms per 1e4 attention units.
        let truth = |x: &Features| 2e-3 * x[0] + 0.5e-3 * x[1] + 0.3e-3 * x[2];
        let mut fit = LinearFit::default();
        for k in 0..200usize {
            let segs = [(k % 97, 1 + k % 13), (0, 1 + (k * 7) % 250)];
            let x = forward_features(segs);
            fit.observe(&x, truth(&x));
        }
        let x = forward_features([(300, 64), (10, 1)]);
        let rel = (fit.predict(&x) - truth(&x)).abs() / truth(&x);
        assert!(rel < 1e-5, "relative error {rel}");
    }

    #[test]
    fn an_unvaried_feature_stays_harmless() {
        // Every observation has the same shape: the fit must still predict it.
        let mut fit = LinearFit::default();
        let x = backward_features(0, 128);
        for _ in 0..50 {
            fit.observe(&x, 0.010);
        }
        assert!((fit.predict(&x) - 0.010).abs() < 1e-6);
        assert!(fit.coefficients().iter().all(|c| c.is_finite()));
    }

    #[test]
    fn follows_a_machine_that_slows_down() {
        let mut fit = LinearFit::default();
        let xs: Vec<Features> = (1..40).map(|n| forward_features([(0, n * 5)])).collect();
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
