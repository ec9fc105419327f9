"""Master -> backup config sync: push over rsync+SSH, receive into a staged, checked, atomically swapped release."""
