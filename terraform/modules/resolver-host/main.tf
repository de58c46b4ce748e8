locals {
  # cloud-init user data. runcmd runs once, as root, after packages are installed.
  # `kmskeys-resolver install` registers the request-key handler; the firewall lets only
  # root reach IMDS, so no other local user can borrow the instance role.
  cloud_config = {
    package_update = true
    packages       = var.os_packages
    write_files = var.resolver_config == "" ? [] : [
      {
        path        = "/etc/kmskeys/resolver.toml"
        owner       = "root:root"
        permissions = "0600"
        content     = var.resolver_config
      },
    ]
    runcmd = [
      ["python3", "-m", "venv", "/opt/kmskeys"],
      ["/opt/kmskeys/bin/pip", "install", "--no-input", var.kmskeys_requirement],
      ["ln", "-sf", "/opt/kmskeys/bin/kmskeys-resolver", "/usr/local/sbin/kmskeys-resolver"],
      ["ln", "-sf", "/opt/kmskeys/bin/kmskeys", "/usr/local/bin/kmskeys"],
      ["/usr/local/sbin/kmskeys-resolver", "install"],
      ["/usr/local/sbin/kmskeys-resolver", "firewall", "apply"],
      # The unit re-applies the rules on every boot, before the network comes up; it ships
      # as package data of the resolver.
      ["/opt/kmskeys/bin/python", "-c", local.copy_unit],
      ["systemctl", "daemon-reload"],
      ["systemctl", "enable", "--now", "kmskeys-firewall.service"],
    ]
  }

  user_data = "#cloud-config\n${yamlencode(local.cloud_config)}"

  copy_unit = join("; ", [
    "import importlib.resources, shutil",
    "unit = importlib.resources.files('resolver') / 'data' / 'kmskeys-firewall.service'",
    "shutil.copyfile(unit, '/etc/systemd/system/kmskeys-firewall.service')",
  ])
}

data "aws_iam_policy_document" "trust" {
  statement {
    sid     = "EC2AssumeRole"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  name                 = var.name
  path                 = var.path
  description          = "kmskeys resolver host: Decrypt of the names it is given; never Encrypt"
  assume_role_policy   = data.aws_iam_policy_document.trust.json
  permissions_boundary = var.permissions_boundary_arn
  tags                 = var.tags
}

data "aws_iam_policy_document" "kms" {
  statement {
    sid       = "DecryptWithNameBinding"
    effect    = "Allow"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]

    condition {
      test     = "ForAnyValue:StringEquals"
      variable = "kms:EncryptionContextKeys"
      values   = ["kmskeys_name"]
    }

    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:kmskeys_name"
      values   = ["false"]
    }

    condition {
      test     = "StringLike"
      variable = "kms:EncryptionContext:kmskeys_name"
      values   = var.allowed_secret_names
    }
  }

  # Explicit deny: a host never creates blobs, even if a broader policy is attached later.
  # ReEncrypt and grants are refused for the same reason.
  statement {
    sid       = "NeverEncrypt"
    effect    = "Deny"
    actions   = ["kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*", "kms:CreateGrant"]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "kms" {
  name   = "kmskeys-decrypt"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.kms.json
}

resource "aws_iam_instance_profile" "this" {
  name = var.name
  path = var.path
  role = aws_iam_role.this.name
  tags = var.tags
}

resource "aws_launch_template" "this" {
  count = var.create_launch_template ? 1 : 0

  name_prefix            = "${var.name}-"
  description            = "kmskeys resolver host: IMDSv2 only, hop limit 1"
  image_id               = var.image_id
  instance_type          = var.instance_type
  vpc_security_group_ids = var.security_group_ids
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64encode(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.this.arn
  }

  # IMDSv2 tokens only, and a PUT hop limit of 1: a token cannot be fetched from a container
  # or through a forwarding hop, only from the host itself, where the firewall limits it to root.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    http_protocol_ipv6          = var.imds_ipv6 ? "enabled" : "disabled"
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = var.root_device_name

    ebs {
      encrypted             = true
      kms_key_id            = var.ebs_kms_key_arn
      volume_size           = var.root_volume_size
      volume_type           = "gp3"
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = var.tags
  }

  tag_specifications {
    resource_type = "volume"
    tags          = var.tags
  }

  tags = var.tags

  lifecycle {
    precondition {
      condition     = var.image_id != null
      error_message = "create_launch_template needs image_id."
    }
  }
}
