pub mod bench;
pub mod engine;
pub mod generate;
pub mod model;
pub mod prompt;
pub mod stop;
