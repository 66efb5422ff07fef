//! Host kernel wrappers (being written).
