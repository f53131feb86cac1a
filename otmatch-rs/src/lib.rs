//! `otmatch`: exact top-k pruning and caption assignment (placeholder, see issue 2).
