"""DuckDB SQL shipped with curator (views and example cohorts)."""
