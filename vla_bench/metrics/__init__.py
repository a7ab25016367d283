"""Success statistics: intervals on rates and differences (`intervals`), regression gates (`gate`)."""
