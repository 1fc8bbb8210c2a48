"""Tools for VMM developers, as library functions returning plain data: explain each request
(:mod:`.explain`), report large-page eligibility, metadata cost and limits (:mod:`.report`),
and draw the guest-physical address map (:mod:`.layout`). The CLI prints what they return."""
