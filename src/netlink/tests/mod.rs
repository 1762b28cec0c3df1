//! Golden-byte tests: our messages against what iproute2 sends for the same object, and our
//! parsers against what the kernel answers. No root needed (STYLE.md §4).
