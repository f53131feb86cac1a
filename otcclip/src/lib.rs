//! `otcclip._otmatch`: the thin Python face of the `otmatch` engine.
//!
//! Thin on purpose: it checks what Python hands over (dtype, layout, shape),
//! borrows float32/int64 C-contiguous arrays in place (never copies them),
//! releases the GIL for the work, turns every refusal into `TypeError` or
//! `ValueError` with the engine's message, and catches any panic so that
//! nothing a caller passes can take the interpreter down.

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::ndarray::Array2;
use numpy::{
    Element, IntoPyArray, PyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use otmatch::{AssignConfig, Fallback, Kernel, MatRef, Method, Threads, TopkConfig};

fn to_py(e: otmatch::Error) -> PyErr {
    match e {
        otmatch::Error::ThreadPool(_) => PyRuntimeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// Runs `f` without the GIL; a panic becomes a RuntimeError instead of unwinding into Python.
fn detached<T: Send, F: FnOnce() -> otmatch::Result<T> + Send>(
    py: Python<'_>,
    f: F,
) -> PyResult<T> {
    let out = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    match out {
        Ok(r) => r.map_err(to_py),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "internal error in otmatch: {msg}"
            )))
        }
    }
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .fully_qualified_name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Borrows `obj` in place as a C-contiguous, aligned, native-endian array of
/// `T` with `ndim` dimensions; anything else is refused with a message that
/// says what was expected and how to convert (we never convert silently).
fn borrow<'py, T: Element, D: numpy::ndarray::Dimension>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    ndim: usize,
    dtype: &str,
    shape_hint: &str,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray of {dtype}, got {} (for a torch tensor use .numpy())",
            describe(obj)
        ))
    })?;
    if arr.ndim() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name} must be {ndim}-D {shape_hint}, got shape {:?}",
            arr.shape()
        )));
    }
    let typed = obj.cast::<PyArray<T, D>>().map_err(|_| {
        let got = arr.dtype().str().map(|s| s.to_string()).unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!(
            "{name} must have dtype {dtype}, got {got}; convert it once with {name}.astype(np.{dtype})"
        ))
    })?;
    if !arr.is_c_contiguous() || !arr.is_aligned() {
        return Err(PyValueError::new_err(format!(
            "{name} must be C-contiguous and aligned; copy it once with np.ascontiguousarray({name})"
        )));
    }
    typed
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name} cannot be read: {e}")))
}

fn slice_of<'a, T: Element, D: numpy::ndarray::Dimension>(
    a: &'a PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

fn matrix<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArray<'py, f32, numpy::Ix2>> {
    borrow::<f32, numpy::Ix2>(obj, name, 2, "float32", "(rows, d)")
}

type TopkOut<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

/// Exact inner-product top-k of each query row against the pool.
///
/// Returns (indices int64 (N, k), scores float32 (N, k)), each row sorted by
/// score descending, ties to the lower pool index. `threads=None` uses the
/// shared pool (all cores); an int uses a dedicated pool of that size.
#[pyfunction]
#[pyo3(signature = (queries, pool, k, threads=None))]
fn topk<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    pool: &Bound<'py, PyAny>,
    k: i64,
    threads: Option<i64>,
) -> PyResult<TopkOut<'py>> {
    let q = matrix(queries, "queries")?;
    let p = matrix(pool, "pool")?;
    let k = usize::try_from(k)
        .map_err(|_| PyValueError::new_err(format!("k must be at least 1, got {k}")))?;
    let threads = match threads {
        None => Threads::Auto,
        Some(t) if t >= 1 => Threads::Count(t as usize),
        Some(t) => {
            return Err(PyValueError::new_err(format!(
                "threads must be at least 1 or None, got {t}"
            )))
        }
    };
    let (qs, ps) = (slice_of(&q, "queries")?, slice_of(&p, "pool")?);
    let (n, d) = (q.shape()[0], q.shape()[1]);
    let (m, dp) = (p.shape()[0], p.shape()[1]);
    let (indices, scores) = detached(py, || {
        let qm = MatRef::new(qs, n, d)?;
        let pm = MatRef::new(ps, m, dp)?;
        let config = TopkConfig {
            threads,
            kernel: Kernel::Auto,
        };
        // Validate before allocating N*k outputs.
        let len = n.checked_mul(k).filter(|_| k >= 1 && k <= m).unwrap_or(0);
        let mut indices = vec![0i64; len];
        let mut scores = vec![0f32; len];
        otmatch::topk_into(qm, pm, k, &config, &mut indices, &mut scores)?;
        Ok((indices, scores))
    })?;
    let shape = (n, k);
    let indices = Array2::from_shape_vec(shape, indices)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?
        .into_pyarray(py);
    let scores = Array2::from_shape_vec(shape, scores)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?
        .into_pyarray(py);
    Ok((indices, scores))
}

type AssignOut<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyDict>,
);

/// One caption per image from candidates and scores; see otcclip.otmatch.assign.
///
/// Returns (caption int64 (N,), changed bool (N,), score float32 (N,), stats dict).
#[pyfunction]
#[pyo3(signature = (candidates, scores, own=None, own_scores=None, method="argmax", capacity=None, margin=0.0, fallback="own"))]
#[allow(clippy::too_many_arguments)]
fn assign<'py>(
    py: Python<'py>,
    candidates: &Bound<'py, PyAny>,
    scores: &Bound<'py, PyAny>,
    own: Option<&Bound<'py, PyAny>>,
    own_scores: Option<&Bound<'py, PyAny>>,
    method: &str,
    capacity: Option<i64>,
    margin: f64,
    fallback: &str,
) -> PyResult<AssignOut<'py>> {
    let method = match (method, capacity) {
        ("argmax", None) => Method::Argmax,
        ("argmax", Some(_)) => {
            return Err(PyValueError::new_err(
                "capacity only applies to method='capacity'; pass capacity=None with 'argmax'",
            ))
        }
        ("capacity", Some(c)) if c >= 1 => Method::Capacity(c as usize),
        ("capacity", Some(c)) => {
            return Err(PyValueError::new_err(format!(
                "capacity must be at least 1, got {c}"
            )))
        }
        ("capacity", None) => {
            return Err(PyValueError::new_err(
                "method='capacity' needs capacity=C (an int >= 1)",
            ))
        }
        (other, _) => {
            return Err(PyValueError::new_err(format!(
                "method must be 'argmax' or 'capacity', got {other:?}"
            )))
        }
    };
    let fallback = match fallback {
        "own" => Fallback::Own,
        "unassigned" => Fallback::Unassigned,
        other => {
            return Err(PyValueError::new_err(format!(
                "fallback must be 'own' or 'unassigned', got {other:?}"
            )))
        }
    };
    let c = borrow::<i64, numpy::Ix2>(candidates, "candidates", 2, "int64", "(N, k)")?;
    let s = borrow::<f32, numpy::Ix2>(scores, "scores", 2, "float32", "(N, k)")?;
    if c.shape() != s.shape() {
        return Err(PyValueError::new_err(format!(
            "scores must have the shape of candidates {:?}, got {:?}",
            c.shape(),
            s.shape()
        )));
    }
    let o = own
        .map(|o| borrow::<i64, numpy::Ix1>(o, "own", 1, "int64", "(N,)"))
        .transpose()?;
    let os = own_scores
        .map(|o| borrow::<f32, numpy::Ix1>(o, "own_scores", 1, "float32", "(N,)"))
        .transpose()?;
    let k = c.shape()[1];
    if c.shape()[0] == 0 {
        return Err(PyValueError::new_err(
            "candidates is empty: need at least one image",
        ));
    }
    let cs = slice_of(&c, "candidates")?;
    let ss = slice_of(&s, "scores")?;
    let osl = o.as_ref().map(|a| slice_of(a, "own")).transpose()?;
    let ossl = os.as_ref().map(|a| slice_of(a, "own_scores")).transpose()?;
    let config = AssignConfig {
        method,
        margin: margin as f32,
        fallback,
    };
    if !margin.is_finite() || margin < 0.0 {
        return Err(PyValueError::new_err(format!(
            "margin must be finite and >= 0, got {margin}"
        )));
    }
    let a = detached(py, || otmatch::assign(cs, ss, k, osl, ossl, &config))?;
    let stats = PyDict::new(py);
    stats.set_item("n", a.stats.n)?;
    stats.set_item("changed", a.stats.changed)?;
    stats.set_item("distinct", a.stats.distinct)?;
    stats.set_item("max_load", a.stats.max_load)?;
    stats.set_item("unassigned", a.stats.unassigned)?;
    stats.set_item("kept_by_margin", a.stats.kept_by_margin)?;
    Ok((
        a.caption.into_pyarray(py),
        a.changed.into_pyarray(py),
        a.score.into_pyarray(py),
        stats,
    ))
}

/// Per-sample assignment history across rounds, keyed by stable int64 ids.
#[pyclass(name = "History", module = "otcclip._otmatch")]
#[derive(Default)]
struct PyHistory {
    inner: otmatch::History,
}

#[pymethods]
impl PyHistory {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Records captions (int64 (N,)) held by samples `ids` (int64 (N,)) in `round`.
    fn record(
        &mut self,
        round: i64,
        ids: &Bound<'_, PyAny>,
        captions: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let i = borrow::<i64, numpy::Ix1>(ids, "ids", 1, "int64", "(N,)")?;
        let c = borrow::<i64, numpy::Ix1>(captions, "captions", 1, "int64", "(N,)")?;
        let (is, cs) = (slice_of(&i, "ids")?, slice_of(&c, "captions")?);
        self.inner.record(round, is, cs).map_err(to_py)
    }

    /// [(round, caption), ...] of sample `id`, oldest first (empty if unknown).
    fn get(&self, id: i64) -> Vec<(i64, i64)> {
        self.inner.get(id).to_vec()
    }

    /// How many times sample `id`'s caption changed from one recorded round to the next.
    fn changes(&self, id: i64) -> usize {
        self.inner.changes(id)
    }

    /// The recorded sample ids, ascending.
    fn ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner.ids().into_pyarray(py)
    }

    /// A deterministic byte string for checkpoints (see from_bytes).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    /// Reads what to_bytes wrote; ValueError on anything else.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        otmatch::History::from_bytes(data)
            .map(|inner| PyHistory { inner })
            .map_err(to_py)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyHistory>()
            .is_ok_and(|o| o.borrow().inner == self.inner)
    }

    fn __repr__(&self) -> String {
        format!("History({} samples)", self.inner.len())
    }
}

/// The address of the buffer `topk` would read for `array` (for the no-copy test).
#[pyfunction]
fn _input_address(array: &Bound<'_, PyAny>) -> PyResult<usize> {
    let a = matrix(array, "array")?;
    Ok(slice_of(&a, "array")?.as_ptr() as usize)
}

/// The inner kernel topk uses on this CPU ("avx512" or "portable").
#[pyfunction]
fn kernel_name() -> &'static str {
    Kernel::Auto.resolved_name()
}

/// How many threads topk would use with `threads`.
#[pyfunction]
#[pyo3(signature = (threads=None))]
fn thread_count(threads: Option<usize>) -> PyResult<usize> {
    otmatch::thread_count(Threads::from(threads)).map_err(to_py)
}

/// The largest thread count topk accepts on this machine (4 per core, at least 8).
#[pyfunction]
fn max_threads() -> usize {
    otmatch::max_threads()
}

#[pymodule]
fn _otmatch(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(topk, m)?)?;
    m.add_function(wrap_pyfunction!(assign, m)?)?;
    m.add_function(wrap_pyfunction!(_input_address, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_name, m)?)?;
    m.add_function(wrap_pyfunction!(thread_count, m)?)?;
    m.add_function(wrap_pyfunction!(max_threads, m)?)?;
    m.add_class::<PyHistory>()?;
    Ok(())
}
