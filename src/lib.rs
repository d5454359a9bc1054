pub mod cli;
pub mod config;
pub mod paid;
pub mod stack;
