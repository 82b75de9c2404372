//! efscache library
