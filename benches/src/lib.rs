//! Rampart's benchmarks: criterion micro-benchmarks under `benches/` and load scenarios, each
//! measured side by side with the peer crate or tool in the same run. Results and the commands
//! that produced them are in `RESULTS.md`.
