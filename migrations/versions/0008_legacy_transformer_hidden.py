"""Stored transformer specs from before model.hidden set the FFN width: hidden = 4 * d_model.

Those jobs trained (and checkpointed) a 4 * d_model FFN whatever `hidden` said; their specs predate
`model.depth_scaled_init`, which tells them apart. Without this, resuming or sampling one would build
a model whose FFN does not match its checkpoint. The engine applies the same rule to checkpoints it
loads (worker.engine.config.upgrade_legacy_spec); the rule is repeated here because a migration must
not change meaning when the code it imports changes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 08:45:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('spec', sa.JSON))


def _legacy_transformer(spec):
    model = spec.get('model') if isinstance(spec, dict) else None
    return isinstance(model, dict) and model.get('arch') == 'transformer' and 'depth_scaled_init' not in model


def upgrade():
    conn = op.get_bind()
    for job_id, spec in conn.execute(sa.select(jobs.c.id, jobs.c.spec)).all():
        if _legacy_transformer(spec):
            model = {**spec['model'], 'hidden': 4 * int(spec['model'].get('d_model', 64))}
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(spec={**spec, 'model': model}))


def downgrade():
    pass  # the old meaning of `hidden` was "ignored": nothing to restore
