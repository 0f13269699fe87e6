//! The boxed error every layer passes causes along in: a leaf, so that bodies, problems
//! and the engine share it without depending on each other.

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
