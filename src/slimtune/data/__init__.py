"""Reading and tokenizing user data files, and building transfer sets."""
