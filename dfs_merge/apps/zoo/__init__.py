"""The zoo: a tiny two-language model family trained here (`family`) from an invented world (`world`)."""
