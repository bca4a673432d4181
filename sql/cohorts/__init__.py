"""Example cohort queries."""
