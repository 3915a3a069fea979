"""20 Questions with an exact attribute oracle and information-gain rewards."""
