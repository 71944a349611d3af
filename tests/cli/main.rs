//! Integration tests: drive the real `mtpack` binary (and, for round trips, the library) on
//! the committed fixtures and on the real backbones fetched by `scripts/fetch.sh`.

mod adapt;
mod backbones;
mod bad_input;
mod bench;
mod data;
mod device;
mod export;
mod exporters;
mod fuzz;
mod graph;
mod helpers;
mod inspect;
mod masks;
mod real;
mod reliability;
mod run;
mod serve;
mod train;
