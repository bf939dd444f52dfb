"""The demo dataset shipped with qlora (people_*.jsonl) and the script that writes it."""
