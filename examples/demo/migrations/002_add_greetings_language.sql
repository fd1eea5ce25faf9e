-- v2 (expand): a column the new code reads. It has a default, so the code
-- of v1, still serving while v2 rolls out, is not bothered by it.
ALTER TABLE greetings ADD COLUMN language text NOT NULL DEFAULT 'en';
