//! One module per benchmark figure; each runs its own stacks and prints Markdown tables.

pub mod emulator;
pub mod footprint;
pub mod pickup;
pub mod recovery;
pub mod throughput;
