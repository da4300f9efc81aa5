//! ekid: online forecasting of streaming time series with recurrent-network ensembles trained
//! by Ensemble Kalman Inversion. See ARCHITECTURE.md for the map of this crate.

pub mod cli;
pub mod config;
pub mod data;
pub mod ensemble;
pub mod eval;
pub mod forecast;
pub mod inspect;
pub mod model;
pub mod network;
pub mod ogd;
pub mod options;
pub mod plot;
pub mod prior;
pub mod real;
pub mod replay;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod stream;
pub mod update;
pub mod wal;
