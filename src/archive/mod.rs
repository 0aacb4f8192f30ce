//! Checks of uploaded archives, made on the bytes as they stream by. Pure: no I/O, tested on bytes in memory.

mod segmented;
pub mod tgz;
pub mod zip;

#[cfg(test)]
mod fuzz;
