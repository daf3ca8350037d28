//! Ark rule packs: the format ([`format`]), its globs ([`glob`]) and the incremental engine
//! ([`engine`]). Reads only the rules directory it is given.

pub mod engine;
pub mod format;
pub mod glob;

pub use engine::{ActiveScene, Engine, EngineConfig, SceneMatch};
pub use format::{LoadedRule, RuleSet, load_dir};
