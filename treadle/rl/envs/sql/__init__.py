"""Text-to-SQL with self-correction on generated SQLite databases, graded by execution match."""
