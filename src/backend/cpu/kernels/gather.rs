//! Row gathers: the token embedding lookup and `select_rows`.

use super::matmul::WeightMatrix;
use super::{KernelError, check_len};
use crate::gguf::quants;

/// `y[r] = table[ids[r]]`, each row dequantized to F32 exactly as ggml's `dequantize_row_*`
/// (ggml: `ggml_get_rows` / `ggml_compute_forward_get_rows`). An id outside the table is an error.
pub fn embedding(table: &WeightMatrix, ids: &[i32], y: &mut [f32]) -> Result<(), KernelError> {
    let k = table.k();
    check_len(
        "embedding output length (ids x row length)",
        y.len(),
        ids.len() * k,
    )?;
    for (r, (&id, out)) in ids.iter().zip(y.chunks_exact_mut(k.max(1))).enumerate() {
        let i =
            usize::try_from(id)
                .ok()
                .filter(|&i| i < table.n())
                .ok_or(KernelError::OutOfRange {
                    what: "token id",
                    index: r,
                    value: i64::from(id),
                    limit: table.n(),
                })?;
        // `WeightMatrix::new` checked the type and sizes, so the row converts.
        quants::dequantize_row_f32(table.ty(), table.row(i).unwrap_or_default(), out)
            .map_err(|e| KernelError::Invalid(e.to_string()))?;
    }
    Ok(())
}

/// `y[o] = x[rows[o]]` for rows of `n` elements: keeps the rows whose logits are wanted.
pub fn select_rows(x: &[f32], n: usize, rows: &[i32], y: &mut [f32]) -> Result<(), KernelError> {
    check_len(
        "select_rows output length (rows x n)",
        y.len(),
        rows.len() * n,
    )?;
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(KernelError::Invalid(format!(
            "select_rows: {} elements are not whole rows of {n}",
            x.len()
        )));
    }
    let t = x.len() / n;
    for (o, (&row, out)) in rows.iter().zip(y.chunks_exact_mut(n)).enumerate() {
        let i = usize::try_from(row)
            .ok()
            .filter(|&i| i < t)
            .ok_or(KernelError::OutOfRange {
                what: "selected row",
                index: o,
                value: i64::from(row),
                limit: t,
            })?;
        out.copy_from_slice(&x[i * n..(i + 1) * n]);
    }
    Ok(())
}
